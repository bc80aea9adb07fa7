"""What a benchmark result was measured on: the commit and any app/ files that differed from it (on a shared
checkout others edit app/ meanwhile). Kept free of heavy imports so light benchmarks can use it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def source_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {"commit": git("rev-parse", "HEAD").strip(), "changed": git("status", "--short", "--", "app").splitlines()}
