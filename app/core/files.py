"""Atomic file writes: every file the service stores is written under a temporary name and renamed into place, so
a reader (this process or another) sees the old file or the new one, never half of one."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(
    path: Path,
    write: Callable[[Path], None],
    *,
    staging_dir: Path | None = None,
    check: Callable[[Path], None] | None = None,
) -> None:
    """Call ``write(tmp)``, then ``check(tmp)`` (which may raise to refuse the file), then rename it to ``path``.

    ``staging_dir`` (default: ``path``'s folder) must be on the same filesystem; ``path``'s folder is created only
    once the file passed ``check``, so a refused file leaves no trace. The temporary file is removed on any error.
    """
    folder = staging_dir or path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        if check is not None:
            check(tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_synced(data: bytes) -> Callable[[Path], None]:
    """A ``write`` for ``atomic_write`` that puts ``data`` on disk before the rename (fsync)."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    return write


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (never whole into memory)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
