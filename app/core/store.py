"""Where task patches live: the one store interface every caller uses, and its local-directory implementation.

Two implementations sit behind :class:`TaskStore`: :class:`LocalTaskStore` (a folder, the default) and
``app.core.object_store.ObjectTaskStore`` (an S3-compatible bucket shared by machines). Callers never learn which
one they have: a task is looked up with ``stat`` (whose :attr:`StoredPatch.etag` changes with every new version),
read with ``fetch`` (a local file holding that version: the store's own file, or a download cached on this machine),
written with ``write_patch`` (validated first, published whole) and removed with ``delete``. The same object holds
the uploads of queued jobs and the stitched models, so a worker on another machine finds them where it finds tasks.

Layout under the local store root::

    tasks/<name>/patch.safetensors        the graft patch (written by the API, ``skillgraft localize`` or a worker)
    tasks/<name>/task.json                upload record: sha256, size, time, source (informational)
    uploads/<job id>/                     a queued job's checkpoint, data and spec
    stitched/<name>/model.safetensors     a stitched model; its report.json is written last
    .staging/                             files on their way in (same filesystem, so a rename publishes them)

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
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
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
# An upload folder is named by its job id (hex), or ``.incoming-…`` while it is being received.
UPLOAD_NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
PATCH_FILE = "patch.safetensors"
TASK_FILE = "task.json"
UPLOADS_DIR = "uploads"
STITCHED_DIR = "stitched"
STITCHED_MODEL_FILE = "model.safetensors"
STITCHED_REPORT_FILE = "report.json"
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


def check_upload_name(name: str) -> str:
    """An upload folder's name (a job id, or a staging name), if safe as one path component or key segment."""
    if not UPLOAD_NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid upload name {name[:80]!r}")
    return name


@dataclass(frozen=True)
class StoredPatch:
    """One stored version of a task's patch as seen by ``stat``: ``etag`` changes whenever the patch is replaced,
    and names the same version on every machine that reads the same store."""

    name: str
    etag: str
    size: int
    modified_at: str


@dataclass(frozen=True)
class StoreHealth:
    """Whether the store answered the last time this process asked it (a local folder always does)."""

    reachable: bool = True
    detail: str = "ok"


class TaskStore(Protocol):
    """Tasks, job uploads and stitched models, wherever they live. Every caller (registry, service, jobs, CLI)
    goes through these methods only; a backend that needs the network keeps what it last saw, so ``stat`` of a
    known task is cheap and keeps answering while the backend is unreachable."""

    # where the store is, for logs (never holds credentials)
    location: str
    # True when other machines share the store over the network (readers then rely on notices and re-checks)
    remote: bool
    # a local folder for files about to be stored (on the store's filesystem when it is local, so rename works)
    scratch_dir: Path

    # -- tasks -------------------------------------------------------------------------------------------------

    def list_names(self) -> list[str]: ...

    def stat(self, name: str) -> StoredPatch | None:
        """The current version of the task, or None when there is no such task."""

    def fetch(self, stored: StoredPatch) -> Path:
        """A local file holding the patch of ``stored``'s version (FileNotFoundError if it is gone)."""

    def read_header(self, name: str) -> dict[str, Any]:
        """The patch's ``skillgraft.meta``, checked against the metadata schema (``PatchError`` if it fails)."""

    def read_record(self, name: str) -> dict[str, Any]: ...

    def write_patch(
        self, name: str, data: bytes, validate: Callable[[Path], None], source: str = "upload"
    ) -> StoredPatch:
        """Run ``validate`` on a staged copy of ``data``, then publish it whole under ``name``."""

    def delete(self, name: str) -> bool: ...

    # -- freshness ---------------------------------------------------------------------------------------------

    def invalidate(self, name: str | None = None) -> None:
        """A notice said ``name`` (None: anything) changed elsewhere: forget what was remembered of it."""

    def sync(self) -> list[str]:
        """Re-check everything remembered against the store (the safety net for missed notices); returns the
        names whose state changed."""

    def health(self) -> StoreHealth: ...

    # -- uploads of queued jobs --------------------------------------------------------------------------------

    def put_upload(self, job_id: str, folder: Path) -> None:
        """Store the files of ``folder`` as job ``job_id``'s upload, all or nothing; ``folder`` is consumed."""

    def open_upload(self, job_id: str) -> AbstractContextManager[Path]:
        """A local folder with the job's uploaded files for the duration of the block (empty when none)."""

    def delete_upload(self, job_id: str) -> None: ...

    def list_uploads(self) -> list[tuple[str, float]]:
        """(upload name, last modified as a POSIX time) of every stored upload, for the retention sweep."""

    # -- stitched models ---------------------------------------------------------------------------------------

    def put_stitched(self, name: str, model_file: Path, report: dict[str, Any]) -> None:
        """Store a stitched model, the report last (a model exists once its report does); consumes the file."""

    def stitched_report(self, name: str) -> dict[str, Any] | None: ...

    def stitched_model(self, name: str) -> Path | None:
        """A local file holding the stitched model, or None when there is none."""

    def stitched_names(self) -> list[str]: ...


def read_patch_meta_text(path: Path) -> str:
    """The raw ``skillgraft.meta`` string of a patch file's header, read without touching any tensor."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > MAX_HEADER_BYTES:
                raise PatchError(f"safetensors header of {length} bytes is implausibly large")
            header = loads_bounded(handle.read(length), max_depth=HEADER_DEPTH)
    except (struct.error, BoundedJSONError) as exc:
        raise PatchError(f"patch header is unreadable: {exc}") from exc
    declared = header.get("__metadata__") if isinstance(header, dict) else None
    text = declared.get("skillgraft.meta") if isinstance(declared, dict) else None
    if not isinstance(text, str):
        raise PatchError("patch has no skillgraft metadata")
    return text


def parse_patch_meta(name: str, text: str) -> dict[str, Any]:
    """A stored patch's metadata checked against the one schema: wrong types are a ``PatchError`` naming the task,
    never a malformed value handed to a response."""
    try:
        meta, _ = parse_patch_metadata(text)
    except PatchMetadataError as exc:
        raise PatchError(f"task {name!r}: {exc}") from exc
    return meta


class LocalTaskStore:
    """A directory store. Safe for several processes: writers rename complete files into place; a delete renames
    the task folder away before removing it, so readers never see a task with a half-deleted folder."""

    remote = False

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.location = f"file://{self.root.resolve()}"
        self.tasks_dir = self.root / "tasks"
        self.staging_dir = self.root / ".staging"
        self.uploads_dir = self.root / UPLOADS_DIR
        self.stitched_dir = self.root / STITCHED_DIR
        self.tasks_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)

    @property
    def scratch_dir(self) -> Path:
        return self.staging_dir

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
        # A rename-into-place gives a new inode even when size and mtime happen to match.
        etag = f"{info.st_ino:x}-{info.st_mtime_ns:x}-{info.st_size:x}"
        modified = datetime.fromtimestamp(info.st_mtime_ns / 1e9, UTC).isoformat(timespec="seconds")
        return StoredPatch(name, etag, info.st_size, modified)

    def require(self, name: str) -> StoredPatch:
        stored = self.stat(name)
        if stored is None:
            raise TaskNotFound(f"task {name!r} not found")
        return stored

    def fetch(self, stored: StoredPatch) -> Path:
        # The live file: if another writer replaced it since ``stat``, the reader gets the newer version and its
        # next ``stat`` shows a new etag, so it reloads; a half-written file is never visible.
        return self.patch_path(stored.name)

    def read_header(self, name: str) -> dict[str, Any]:
        """The patch's ``skillgraft.meta`` without reading any tensor (cheap enough to list many tasks)."""
        path = self.patch_path(self.require(name).name)
        try:
            text = read_patch_meta_text(path)
        except FileNotFoundError as exc:
            raise TaskNotFound(f"task {name!r} not found") from exc
        except PatchError as exc:
            raise PatchError(f"task {name!r}: {exc}") from exc
        return parse_patch_meta(name, text)

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

    # -- freshness: every ``stat`` reads the folder, so there is nothing remembered to re-check ------------------

    def invalidate(self, name: str | None = None) -> None:
        return None

    def sync(self) -> list[str]:
        return []

    def health(self) -> StoreHealth:
        return StoreHealth()

    # -- uploads -----------------------------------------------------------------------------------------------

    def upload_dir(self, job_id: str) -> Path:
        return self.uploads_dir / check_upload_name(job_id)

    def put_upload(self, job_id: str, folder: Path) -> None:
        target = self.upload_dir(job_id)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder, target)

    @contextmanager
    def open_upload(self, job_id: str) -> Iterator[Path]:
        yield self.upload_dir(job_id)

    def delete_upload(self, job_id: str) -> None:
        shutil.rmtree(self.upload_dir(job_id), ignore_errors=True)

    def list_uploads(self) -> list[tuple[str, float]]:
        if not self.uploads_dir.is_dir():
            return []
        found = []
        for folder in self.uploads_dir.iterdir():
            try:
                if folder.is_dir() and UPLOAD_NAME_PATTERN.fullmatch(folder.name):
                    found.append((folder.name, folder.stat().st_mtime))
            except FileNotFoundError:  # removed meanwhile by another sweeper
                continue
        return found

    # -- stitched models ---------------------------------------------------------------------------------------

    def stitched_folder(self, name: str) -> Path:
        return self.stitched_dir / check_task_name(name)

    def put_stitched(self, name: str, model_file: Path, report: dict[str, Any]) -> None:
        folder = self.stitched_folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(model_file, folder / STITCHED_MODEL_FILE)
        self._write_json(folder / STITCHED_REPORT_FILE, report)

    def stitched_report(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads((self.stitched_folder(name) / STITCHED_REPORT_FILE).read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def stitched_model(self, name: str) -> Path | None:
        folder = self.stitched_folder(name)
        path = folder / STITCHED_MODEL_FILE
        return path if path.is_file() and (folder / STITCHED_REPORT_FILE).is_file() else None

    def stitched_names(self) -> list[str]:
        if not self.stitched_dir.is_dir():
            return []
        return sorted(p.name for p in self.stitched_dir.iterdir() if (p / STITCHED_REPORT_FILE).is_file())

    def _write_json(self, path: Path, data: dict[str, Any]) -> None:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True)))
