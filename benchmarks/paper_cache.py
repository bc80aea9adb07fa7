"""On-disk cache for benchmarks/reproduce_paper.py: one record per cell, keyed by a hash of its inputs.

A cell is a fine-tune (one grid point of one task × seed), a mask (one method × size of one fine-tune) or an
evaluation (one mask, or the references θ_pre/θ_ft, on one example set). Each record is a JSON file named by the
SHA-256 of its canonical inputs (which include the base fingerprint), next to its tensors where it has any, so an
interrupted run resumes where it stopped and runs with different subsets (--tasks, --seeds, --sizes, --methods)
share what they have in common. Writes go through a temporary file and a rename: a killed run never leaves half
a record.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def cell_key(inputs: dict[str, Any]) -> str:
    """Stable hash of a cell's inputs (sorted-key JSON; floats as repr so 1e-4 and 0.0001 agree)."""
    text = json.dumps(inputs, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / kind / f"{key}{suffix}"

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        path = self._path(kind, key, ".json")
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def put(self, kind: str, key: str, record: dict[str, Any]) -> dict[str, Any]:
        path = self._path(kind, key, ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1, default=str)))
        return record

    def tensor_path(self, kind: str, key: str) -> Path:
        return self._path(kind, key, ".safetensors")

    def put_tensors(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> Path:
        path = self.tensor_path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        contiguous = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        self._atomic(path, lambda tmp: save_file(contiguous, tmp))
        return path

    def get_tensors(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        path = self.tensor_path(kind, key)
        return load_file(str(path)) if path.is_file() else None

    def drop_tensors(self, kind: str, key: str) -> None:
        self.tensor_path(kind, key).unlink(missing_ok=True)

    def records(self, kind: str) -> Iterator[dict[str, Any]]:
        folder = self.root / kind
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.json")):
            try:
                yield json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue

    @staticmethod
    def _atomic(path: Path, write: Any) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
