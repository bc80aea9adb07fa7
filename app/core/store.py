"""Where task patches live: a store interface and its local-directory implementation.

Layout under the store root::

    tasks/<name>/patch.safetensors   the graft patch (written by the API, ``skillgraft localize`` or a worker)
    tasks/<name>/task.json           upload record: sha256, size, time, source (informational)

Every write goes to a temporary file on the same filesystem and is renamed into place, so a reader (this server,
another process) sees either the old file or the new one, never half of one. A task exists when its
``patch.safetensors`` exists: a worker in another process may add one at any time, which is why readers key
their caches on :attr:`StoredPatch.etag` rather than on anything held in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from app.core.errors import InvalidTaskName, TaskNotFound
from app.core.files import atomic_write, write_bytes_synced
from app.grafting.bounded_json import BoundedJSONError, loads_bounded
from app.grafting.patch import PatchError
from app.grafting.patch_metadata import PatchMetadataError, parse_patch_metadata

TASK_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
PATCH_FILE = "patch.safetensors"
TASK_FILE = "task.json"
# A safetensors header larger than this is not a patch header (ours are a few KiB): refuse before reading it.
MAX_HEADER_BYTES = 16 * 2**20
# A safetensors header is an object of tensor entries and one string map: three levels deep.
HEADER_DEPTH = 4


def check_task_name(name: str) -> str:
    """The name, if safe as one path component and URL segment; never build a store path from anything else."""
    if not isinstance(name, str) or not TASK_NAME_PATTERN.fullmatch(name):
        raise InvalidTaskName(
            f"invalid task name {str(name)[:80]!r}: use 1-64 characters from a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class StoredPatch:
    """One stored patch file as seen by ``stat``: its etag changes whenever the file is replaced."""

    name: str
    path: Path
    size: int
    mtime_ns: int
    inode: int

    @property
    def etag(self) -> str:
        # A rename-into-place gives a new inode even when size and mtime happen to match.
        return f"{self.inode:x}-{self.mtime_ns:x}-{self.size:x}"

    @property
    def modified_at(self) -> str:
        return datetime.fromtimestamp(self.mtime_ns / 1e9, UTC).isoformat(timespec="seconds")


class TaskStore(Protocol):
    """What the registry needs from a store; a later object-store backend implements the same methods."""

    def list_names(self) -> list[str]: ...

    def stat(self, name: str) -> StoredPatch | None: ...

    def read_header(self, name: str) -> dict[str, Any]: ...

    def read_record(self, name: str) -> dict[str, Any]: ...

    def write_patch(
        self, name: str, data: bytes, validate: Callable[[Path], None], source: str = "upload"
    ) -> StoredPatch: ...

    def delete(self, name: str) -> bool: ...


class LocalTaskStore:
    """A directory store. Safe for several processes: writers rename complete files into place; a delete renames
    the task folder away before removing it, so readers never see a task with a half-deleted folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.tasks_dir = self.root / "tasks"
        self.staging_dir = self.root / ".staging"
        self.tasks_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)

    def task_dir(self, name: str) -> Path:
        return self.tasks_dir / check_task_name(name)

    def patch_path(self, name: str) -> Path:
        return self.task_dir(name) / PATCH_FILE

    def list_names(self) -> list[str]:
        names = []
        for entry in self.tasks_dir.iterdir():
            # Folders that do not match the pattern (temporary, foreign) are not tasks.
            if TASK_NAME_PATTERN.fullmatch(entry.name) and (entry / PATCH_FILE).is_file():
                names.append(entry.name)
        return sorted(names)

    def stat(self, name: str) -> StoredPatch | None:
        path = self.patch_path(name)
        try:
            info = path.stat()
        except FileNotFoundError:
            return None
        return StoredPatch(name, path, info.st_size, info.st_mtime_ns, info.st_ino)

    def require(self, name: str) -> StoredPatch:
        stored = self.stat(name)
        if stored is None:
            raise TaskNotFound(f"task {name!r} not found")
        return stored

    def read_header(self, name: str) -> dict[str, Any]:
        """The patch's ``skillgraft.meta`` without reading any tensor (cheap enough to list many tasks), checked
        against the one metadata schema: a patch another process wrote with wrong types is a ``PatchError`` here,
        never a malformed value handed to a response."""
        path = self.require(name).path
        try:
            with path.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > MAX_HEADER_BYTES:
                    raise PatchError(f"safetensors header of {length} bytes is implausibly large")
                header = loads_bounded(handle.read(length), max_depth=HEADER_DEPTH)
        except FileNotFoundError as exc:
            raise TaskNotFound(f"task {name!r} not found") from exc
        except (struct.error, BoundedJSONError) as exc:
            raise PatchError(f"patch header of task {name!r} is unreadable: {exc}") from exc
        declared = header.get("__metadata__") if isinstance(header, dict) else None
        text = declared.get("skillgraft.meta") if isinstance(declared, dict) else None
        if not isinstance(text, str):
            raise PatchError(f"patch of task {name!r} has no skillgraft metadata")
        try:
            meta, _ = parse_patch_metadata(text)
        except PatchMetadataError as exc:
            raise PatchError(f"task {name!r}: {exc}") from exc
        return meta

    def read_record(self, name: str) -> dict[str, Any]:
        try:
            return dict(json.loads((self.task_dir(name) / TASK_FILE).read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError, ValueError):
            # A patch dropped in by another tool has no record: the patch alone defines the task.
            return {}

    def write_patch(
        self, name: str, data: bytes, validate: Callable[[Path], None], source: str = "upload"
    ) -> StoredPatch:
        """Stage ``data``, run ``validate`` on the staged file, then rename it into place. A patch that fails
        validation leaves the store untouched (no folder is created for a new name)."""
        folder = self.task_dir(name)
        atomic_write(folder / PATCH_FILE, write_bytes_synced(data), staging_dir=self.staging_dir, check=validate)
        stored = self.require(name)
        record = {
            "name": name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "etag": stored.etag,
            "stored_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": source,
        }
        self._write_json(folder / TASK_FILE, record)
        return stored

    def delete(self, name: str) -> bool:
        folder = self.task_dir(name)
        if not folder.is_dir():
            return False
        trash = self.staging_dir / f"deleted-{name}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(folder, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _write_json(self, path: Path, data: dict[str, Any]) -> None:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True)))
