"""Tasks, uploads and stitched models in an S3-compatible bucket (AWS S3, MinIO, …), behind ``TaskStore``.

``SKILLGRAFT_STORE_URL=s3://bucket/prefix`` selects it; the endpoint, region and credentials come from the usual
AWS environment (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, profiles),
read by boto3 itself. All S3 calls go through :class:`S3Objects` (boto3's client and its managed transfers, which
stream files in bounded parts); nothing here speaks the protocol by hand.

Layout under the prefix::

    tasks/<name>.json                            the task's pointer and record (sha256, size, time, source, metadata)
    patches/<name>/<sha256>.safetensors          patch bytes; a new version is a new key, never an overwrite
    uploads/<job id>/<file>, …/manifest.json     a queued job's upload; the manifest is written last
    stitched/<name>/model.safetensors, report.json   a stitched model; the report is written last

**All or nothing.** A patch is uploaded under its own content-addressed key first, and the task is published by
writing its pointer last: a reader sees the old pointer or the new one, and the blob a pointer names is complete
before the pointer exists (S3 makes a single PUT or a completed multipart upload visible whole). Uploads and
stitched models follow the same rule with their manifest and report.

**Fresh but cheap.** Each replica remembers each task's pointer (:class:`_Known`) and answers ``stat`` from memory
for ``recheck_s`` seconds; after that it asks the bucket again. Notices from other replicas (``invalidate``) and the
periodic ``sync`` (one LIST) make changes visible sooner; the etag is the patch's sha256, the same on every machine.

**Cached and resilient.** Patch bytes are downloaded once per machine into a byte-bounded file cache keyed by
sha256 (checked on arrival). While the bucket is unreachable, tasks this replica has seen keep their last known
state and cached files, writes fail with ``StoreUnavailable`` (503), and ``health`` says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

from app.core.errors import StoreUnavailable, TaskNotFound
from app.core.files import sha256_file, write_bytes_synced
from app.core.store import (
    STITCHED_MODEL_FILE,
    STITCHED_REPORT_FILE,
    TASK_NAME_PATTERN,
    LocalTaskStore,
    StoredPatch,
    StoreHealth,
    TaskStore,
    check_task_name,
    check_upload_name,
    parse_patch_meta,
    read_patch_meta_text,
)
from app.grafting.bounded_json import BoundedJSONError, loads_bounded
from app.grafting.patch import PatchError

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger("skillgraft.store")
T = TypeVar("T")

# A pointer holds a record and the patch's metadata (at most 4 MiB by the metadata schema): more is not ours.
MAX_POINTER_BYTES = 5 * 2**20
MAX_JSON_DEPTH = 24
UPLOAD_MANIFEST = "manifest.json"
# Files an upload may hold (as the job service names them): nothing else is ever written from a manifest.
UPLOAD_FILE_PATTERN = re.compile(r"^(checkpoint|train|dev|spec)\.(safetensors|zip|jsonl|csv|json)$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
# A dead endpoint must fail fast (requests waiting on it hold threads); a slow transfer may take its time per part.
CONNECT_TIMEOUT_S = 2.0
# Parts of a managed transfer: memory stays near part size × concurrency whatever the file's size.
PART_BYTES = 16 * 2**20
PART_CONCURRENCY = 4
# Error codes that mean "the bucket is there but will not serve us": a misconfiguration, reported as such.
REFUSALS = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket", "AllAccessDisabled"}
MISSING = {"NoSuchKey", "404", "NotFound"}
# ``checked_at`` of an entry that must be read again before it is trusted
STALE = float("-inf")
# Names remembered as absent (asked for, not found) beyond this many are forgotten, oldest first: requests for
# made-up names must not grow memory without bound.
MAX_ABSENT_REMEMBERED = 10_000


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/prefix`` split into its parts; the prefix is empty or ends with ``/``."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
        if parsed.query or parsed.fragment or "@" in parsed.netloc:
            raise ValueError("an s3:// store URL holds a bucket and a prefix only (credentials come from AWS_*)")
        prefix = parsed.path.strip("/")
        return cls(parsed.netloc, f"{prefix}/" if prefix else "")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's prefix
    etag: str
    size: int
    modified: float  # POSIX time


class S3Objects:
    """The bucket below a prefix, through boto3: keys are relative to the prefix. A missing object is
    ``FileNotFoundError``; a bucket that cannot be reached or refuses us is ``StoreUnavailable``. Every call
    records whether the bucket answered, which is what ``health`` reports."""

    def __init__(
        self,
        location: S3Location,
        *,
        timeout_s: float = 30.0,
        addressing_style: str = "auto",
        client: Any = None,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.where = location
        if client is None:
            config = Config(
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=timeout_s,
                retries={"max_attempts": 2, "mode": "standard"},
                s3={"addressing_style": addressing_style},
                max_pool_connections=32,
                # S3-compatible stores differ in the checksums they accept: send one only where S3 requires it
                # (patches carry their own sha256, checked on arrival)
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            client = boto3.session.Session().client("s3", config=config)
        self.client = client
        self.transfer = TransferConfig(
            multipart_threshold=PART_BYTES,
            multipart_chunksize=PART_BYTES,
            max_concurrency=PART_CONCURRENCY,
            use_threads=True,
        )
        self._health = StoreHealth()
        self._failed_at: float | None = None

    @property
    def endpoint(self) -> str:
        return str(getattr(self.client.meta, "endpoint_url", ""))

    def key(self, relative: str) -> str:
        return self.where.prefix + relative

    # -- calls -------------------------------------------------------------------------------------------------

    def get_bytes(self, relative: str, limit: int) -> tuple[bytes, str]:
        """The object's bytes (at most ``limit``; more is a ``ValueError``) and its etag."""

        def call() -> tuple[bytes, str]:
            response = self.client.get_object(Bucket=self.where.bucket, Key=self.key(relative))
            with response["Body"] as body:
                data = body.read(limit + 1)
            if len(data) > limit:
                raise ValueError(f"object {relative} is over {limit} bytes")
            return data, _etag(response["ETag"])

        return self._call(relative, call)

    def put_bytes(self, relative: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        def call() -> str:
            response = self.client.put_object(
                Bucket=self.where.bucket, Key=self.key(relative), Body=data, ContentType=content_type
            )
            return _etag(response["ETag"])

        return self._call(relative, call)

    def upload_file(self, relative: str, path: Path) -> None:
        """Stream a local file up in parts (multipart above one part): memory stays bounded whatever its size, and
        the object appears only once every part has arrived."""
        self._call(
            relative,
            lambda: self.client.upload_file(str(path), self.where.bucket, self.key(relative), Config=self.transfer),
        )

    def download_file(self, relative: str, target: Path) -> None:
        """Stream an object down to ``target`` in parts."""
        self._call(
            relative,
            lambda: self.client.download_file(self.where.bucket, self.key(relative), str(target), Config=self.transfer),
        )

    def head(self, relative: str) -> ObjectInfo | None:
        def call() -> ObjectInfo:
            response = self.client.head_object(Bucket=self.where.bucket, Key=self.key(relative))
            modified = response["LastModified"].timestamp()
            return ObjectInfo(relative, _etag(response["ETag"]), int(response["ContentLength"]), modified)

        try:
            return self._call(relative, call)
        except FileNotFoundError:
            return None

    def list(self, relative_prefix: str) -> list[ObjectInfo]:
        def call() -> list[ObjectInfo]:
            found = []
            paginator = self.client.get_paginator("list_objects_v2")
            skip = len(self.where.prefix)
            for page in paginator.paginate(Bucket=self.where.bucket, Prefix=self.key(relative_prefix)):
                for item in page.get("Contents", ()):
                    found.append(
                        ObjectInfo(
                            item["Key"][skip:], _etag(item["ETag"]), int(item["Size"]), item["LastModified"].timestamp()
                        )
                    )
            return found

        return self._call(relative_prefix, call)

    def delete(self, relatives: list[str]) -> None:
        for start in range(0, len(relatives), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self.key(relative)} for relative in relatives[start : start + 1000]]
            self._call(
                relatives[start],
                lambda batch=batch: self.client.delete_objects(
                    Bucket=self.where.bucket, Delete={"Objects": batch, "Quiet": True}
                ),
            )

    def probe(self) -> None:
        """One cheap request, to learn whether the bucket answers (HEAD bucket)."""
        self._call("", lambda: self.client.head_bucket(Bucket=self.where.bucket))

    # -- health ------------------------------------------------------------------------------------------------

    def health(self) -> StoreHealth:
        return self._health

    def failed_within(self, seconds: float) -> bool:
        """Whether the last call failed less than ``seconds`` ago (callers then answer from memory instead)."""
        failed_at = self._failed_at
        return failed_at is not None and not self._health.reachable and time.monotonic() - failed_at < seconds

    def _call(self, relative: str, call: Callable[[], T]) -> T:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError
        from s3transfer.exceptions import RetriesExceededError

        try:
            result = call()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in MISSING or (status == 404 and code not in REFUSALS):
                self._answered()
                raise FileNotFoundError(relative) from None
            if code in REFUSALS or status in (401, 403):
                self._failed(f"refused: {code or status}")
                raise StoreUnavailable(f"the object store refused the request ({code or status})") from None
            if status >= 500 or status == 429:
                self._failed("unreachable")
                raise StoreUnavailable(f"the object store is unavailable ({code or status})") from None
            self._answered()
            raise
        except (BotoCoreError, RetriesExceededError, S3UploadFailedError, ConnectionError) as exc:
            self._failed("unreachable")
            raise StoreUnavailable(f"the object store is unreachable ({type(exc).__name__})") from None
        self._answered()
        return result

    def _answered(self) -> None:
        if not self._health.reachable:
            log.warning("object store %s answers again", self.where)
        self._health = StoreHealth()
        self._failed_at = None

    def _failed(self, detail: str) -> None:
        if self._health.reachable:
            log.warning("object store %s: %s", self.where, detail)
        self._health = StoreHealth(reachable=False, detail=detail)
        self._failed_at = time.monotonic()


def _etag(raw: str) -> str:
    return raw.strip('"')


class FileCache:
    """Files downloaded from the store, under one folder, bounded in bytes: the least recently used go first.

    Files are only added by rename from a temporary file in the same folder tree, so a reader never opens half of
    one. Their names carry their version (a sha256 or etag), so an entry is never stale, only unused. Several
    processes may share the folder: the byte total kept here is an estimate, recounted whenever it says "over".
    """

    # a temporary file this old was left by a process that died mid-download
    ABANDONED_S = 3600

    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self.temp_dir = root / ".tmp"
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._remove_abandoned()
        self._total = sum(size for _, _, size in self._entries())

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def get(self, path: Path) -> Path | None:
        try:
            os.utime(path)  # marks it recently used
        except FileNotFoundError:
            return None
        return path

    def temp(self) -> Path:
        return self.temp_dir / f"{uuid.uuid4().hex}.part"

    def admit(self, temp: Path, path: Path) -> Path:
        """Publish a finished temporary file (from ``temp()``) under ``path``, then keep within the budget."""
        size = temp.stat().st_size
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, path)
        with self._lock:
            self._total += size
            over = self._total > self.budget_bytes
        if over:
            self.trim(keep=path)
        return path

    def size_bytes(self) -> int:
        return sum(size for _, _, size in self._entries())

    def trim(self, keep: Path | None = None) -> None:
        with self._lock:
            entries = sorted(self._entries(), key=lambda entry: entry[1])
            total = sum(size for _, _, size in entries)
            for path, _, size in entries:
                if total <= self.budget_bytes:
                    break
                if path == keep:
                    continue
                path.unlink(missing_ok=True)
                total -= size
            self._total = total

    def _entries(self) -> list[tuple[Path, float, int]]:
        entries = []
        for folder, _, files in os.walk(self.root):
            if Path(folder) == self.temp_dir:
                continue
            for file in files:
                path = Path(folder) / file
                try:
                    info = path.stat()
                except FileNotFoundError:
                    continue
                entries.append((path, info.st_mtime, info.st_size))
        return entries

    def _remove_abandoned(self) -> None:
        cutoff = time.time() - self.ABANDONED_S
        for temp in self.temp_dir.iterdir():
            try:
                if temp.stat().st_mtime < cutoff:
                    temp.unlink(missing_ok=True)
            except FileNotFoundError:
                continue


@dataclass
class _Known:
    """What this process last saw of one task: its pointer (None: no such task) and when it checked."""

    stored: StoredPatch | None
    pointer: dict[str, Any] | None
    pointer_etag: str | None
    checked_at: float


class ObjectTaskStore:
    """A :class:`TaskStore` in an S3-compatible bucket (see the module docstring for layout and policy)."""

    remote = True

    def __init__(
        self,
        objects: S3Objects,
        local_dir: Path,
        cache_dir: Path | None = None,
        cache_bytes: int = 2 * 2**30,
        recheck_s: float = 2.0,
    ) -> None:
        self.objects = objects
        self.location = str(objects.where)
        self.local_dir = Path(local_dir)
        self.scratch_dir = self.local_dir / ".staging"
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        self.cache = FileCache(Path(cache_dir) if cache_dir else self.local_dir / "cache", cache_bytes)
        self.recheck_s = recheck_s
        self._lock = threading.Lock()
        self._known: dict[str, _Known] = {}
        # how many entries of _known may be absent ones (an upper bound: recounted when it passes the limit)
        self._absent = 0
        # names from the last listing that succeeded (None: never listed), for listings while unreachable
        self._listed: list[str] | None = None

    # -- tasks -------------------------------------------------------------------------------------------------

    def list_names(self) -> list[str]:
        try:
            names = sorted(self._pointer_etags())
        except StoreUnavailable:
            with self._lock:
                if self._listed is None and not self._known:
                    raise
                names_seen = set(self._listed or ())
                names_seen |= {name for name, known in self._known.items() if known.stored is not None}
                absent = {name for name, known in self._known.items() if known.stored is None}
            return sorted(names_seen - absent)
        with self._lock:
            self._listed = names
        return names

    def stat(self, name: str) -> StoredPatch | None:
        check_task_name(name)
        with self._lock:
            known = self._known.get(name)
        if known is not None and time.monotonic() - known.checked_at < self.recheck_s:
            return known.stored
        if self.objects.failed_within(max(self.recheck_s, 1.0)):
            # The bucket just failed: answer from memory without waiting on it again (the sync loop probes it).
            if known is not None:
                return known.stored
            raise StoreUnavailable(f"the object store is unreachable and task {name!r} was never seen here")
        return self._check(name, known)

    def fetch(self, stored: StoredPatch) -> Path:
        name = check_task_name(stored.name)
        sha = stored.etag
        if not SHA256_PATTERN.fullmatch(sha):
            raise PatchError(f"task {name!r}: its pointer in the object store is unreadable")
        path = self.cache.path("patches", name, f"{sha}.safetensors")
        if self.cache.get(path) is not None:
            return path
        temp = self.cache.temp()
        try:
            self.objects.download_file(_patch_key(name, sha), temp)
            if sha256_file(temp) != sha:
                raise PatchError(f"task {name!r}: the stored patch does not match its sha256")
            return self.cache.admit(temp, path)
        finally:
            temp.unlink(missing_ok=True)

    def read_header(self, name: str) -> dict[str, Any]:
        stored, pointer = self._current(name)
        if pointer is None:
            raise PatchError(f"task {name!r}: its pointer in the object store is unreadable")
        text = pointer.get("meta")
        if not isinstance(text, str):  # a pointer written without the metadata: read it from the patch
            try:
                text = read_patch_meta_text(self.fetch(stored))
            except PatchError as exc:
                raise PatchError(f"task {name!r}: {exc}") from exc
        return parse_patch_meta(name, text)

    def read_record(self, name: str) -> dict[str, Any]:
        try:
            _, pointer = self._current(name)
        except TaskNotFound:
            return {}
        return {k: v for k, v in (pointer or {}).items() if k not in ("meta", "format")}

    def write_patch(
        self, name: str, data: bytes, validate: Callable[[Path], None], source: str = "upload"
    ) -> StoredPatch:
        """Validate a local copy, upload the bytes under their sha256, then publish the pointer (last)."""
        check_task_name(name)
        # staged in the cache's own folder tree, so the file this machine just wrote joins its cache by rename
        temp = self.cache.temp()
        try:
            write_bytes_synced(data)(temp)
            validate(temp)
            try:
                meta_text: str | None = read_patch_meta_text(temp)
            except (PatchError, OSError):  # the caller's validation passed it: the header is read on demand
                meta_text = None
            sha = hashlib.sha256(data).hexdigest()
            previous = self._fresh_sha(name)
            self.objects.upload_file(_patch_key(name, sha), temp)
            stored_at = datetime.now(UTC).isoformat(timespec="seconds")
            pointer: dict[str, Any] = {
                "format": 1,
                "name": name,
                "sha256": sha,
                "size": len(data),
                "etag": sha,
                "stored_at": stored_at,
                "source": source,
            }
            if meta_text is not None:
                pointer["meta"] = meta_text
            pointer_etag = self.objects.put_bytes(
                _pointer_key(name), json.dumps(pointer, sort_keys=True).encode(), "application/json"
            )
            stored = StoredPatch(name, sha, len(data), stored_at)
            self._remember(name, stored, pointer, pointer_etag)
            # This machine keeps what it just wrote: serving it needs no download.
            self.cache.admit(temp, self.cache.path("patches", name, f"{sha}.safetensors"))
        finally:
            temp.unlink(missing_ok=True)
        if previous is not None and previous != sha:
            self._delete_quietly([_patch_key(name, previous)])
        return stored

    def delete(self, name: str) -> bool:
        check_task_name(name)
        try:
            raw, _ = self.objects.get_bytes(_pointer_key(name), MAX_POINTER_BYTES)
        except FileNotFoundError:
            self._remember(name, None, None, None)
            return False
        pointer = _parse_pointer(raw)
        # the pointer goes first: from that moment the task does not exist for anyone
        self.objects.delete([_pointer_key(name)])
        self._remember(name, None, None, None)
        if pointer is not None:
            self._delete_quietly([_patch_key(name, pointer["sha256"])])
        return True

    # -- freshness ---------------------------------------------------------------------------------------------

    def invalidate(self, name: str | None = None) -> None:
        # Marked stale, not forgotten: the next ``stat`` asks the bucket, and if the bucket cannot answer, what was
        # last seen still serves (a notice must not turn a cached task into a 503).
        with self._lock:
            for known in self._known.values() if name is None else filter(None, [self._known.get(name)]):
                known.checked_at = STALE

    def sync(self) -> list[str]:
        """One LIST of the pointers: entries whose pointer changed or vanished are marked stale (the next ``stat``
        reads them again), the rest count as checked now. Returns the names that changed."""
        try:
            current = self._pointer_etags()
        except StoreUnavailable:
            return []
        now = time.monotonic()
        changed = []
        with self._lock:
            self._listed = sorted(current)
            for name, known in list(self._known.items()):
                if current.get(name) == known.pointer_etag:
                    known.checked_at = now
                else:
                    known.checked_at = STALE
                    changed.append(name)
        return changed

    def health(self) -> StoreHealth:
        return self.objects.health()

    # -- uploads -----------------------------------------------------------------------------------------------

    def put_upload(self, job_id: str, folder: Path) -> None:
        check_upload_name(job_id)
        files = sorted(path for path in folder.iterdir() if path.is_file())
        sent: list[str] = []
        try:
            for path in files:
                key = f"uploads/{job_id}/{path.name}"
                self.objects.upload_file(key, path)
                sent.append(key)
            manifest = {
                "files": {path.name: path.stat().st_size for path in files},
                "stored_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            self.objects.put_bytes(f"uploads/{job_id}/{UPLOAD_MANIFEST}", json.dumps(manifest).encode())
        except BaseException:
            # without its manifest the upload does not exist; what got through is removed now or by the sweep
            self._delete_quietly(sent)
            raise
        shutil.rmtree(folder, ignore_errors=True)

    @contextmanager
    def open_upload(self, job_id: str) -> Iterator[Path]:
        check_upload_name(job_id)
        folder = self.scratch_dir / f"upload-{job_id}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        try:
            try:
                raw, _ = self.objects.get_bytes(f"uploads/{job_id}/{UPLOAD_MANIFEST}", MAX_POINTER_BYTES)
                files = loads_bounded(raw, max_depth=MAX_JSON_DEPTH).get("files", {})
            except FileNotFoundError:
                files = {}
            for file_name in files if isinstance(files, dict) else ():
                if UPLOAD_FILE_PATTERN.fullmatch(str(file_name)):
                    self.objects.download_file(f"uploads/{job_id}/{file_name}", folder / file_name)
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def delete_upload(self, job_id: str) -> None:
        check_upload_name(job_id)
        keys = [info.key for info in self.objects.list(f"uploads/{job_id}/")]
        if keys:
            self.objects.delete(keys)

    def list_uploads(self) -> list[tuple[str, float]]:
        newest: dict[str, float] = {}
        for info in self.objects.list("uploads/"):
            parts = info.key.split("/")
            if len(parts) == 3:
                newest[parts[1]] = max(newest.get(parts[1], 0.0), info.modified)
        return sorted(newest.items())

    # -- stitched models ---------------------------------------------------------------------------------------

    def put_stitched(self, name: str, model_file: Path, report: dict[str, Any]) -> None:
        check_task_name(name)
        try:
            self.objects.upload_file(f"stitched/{name}/{STITCHED_MODEL_FILE}", model_file)
            self.objects.put_bytes(
                f"stitched/{name}/{STITCHED_REPORT_FILE}",
                json.dumps(report, sort_keys=True).encode(),
                "application/json",
            )
        finally:
            model_file.unlink(missing_ok=True)

    def stitched_report(self, name: str) -> dict[str, Any] | None:
        check_task_name(name)
        try:
            raw, _ = self.objects.get_bytes(f"stitched/{name}/{STITCHED_REPORT_FILE}", MAX_POINTER_BYTES)
            report = loads_bounded(raw, max_depth=MAX_JSON_DEPTH)
        except (FileNotFoundError, BoundedJSONError, ValueError):
            return None
        return dict(report) if isinstance(report, dict) else None

    def stitched_model(self, name: str) -> Path | None:
        check_task_name(name)
        if self.objects.head(f"stitched/{name}/{STITCHED_REPORT_FILE}") is None:
            return None
        info = self.objects.head(f"stitched/{name}/{STITCHED_MODEL_FILE}")
        if info is None:
            return None
        path = self.cache.path("stitched", name, f"{re.sub(r'[^0-9A-Za-z-]', '', info.etag)}.safetensors")
        if self.cache.get(path) is not None:
            return path
        temp = self.cache.temp()
        try:
            self.objects.download_file(f"stitched/{name}/{STITCHED_MODEL_FILE}", temp)
            return self.cache.admit(temp, path)
        except FileNotFoundError:
            return None
        finally:
            temp.unlink(missing_ok=True)

    def stitched_names(self) -> list[str]:
        names = set()
        for info in self.objects.list("stitched/"):
            parts = info.key.split("/")
            if len(parts) == 3 and parts[2] == STITCHED_REPORT_FILE and TASK_NAME_PATTERN.fullmatch(parts[1]):
                names.add(parts[1])
        return sorted(names)

    # -- internals ---------------------------------------------------------------------------------------------

    def _pointer_etags(self) -> dict[str, str]:
        found = {}
        for info in self.objects.list("tasks/"):
            name = info.key.removeprefix("tasks/").removesuffix(".json")
            if info.key.endswith(".json") and TASK_NAME_PATTERN.fullmatch(name):
                found[name] = info.etag
        return found

    def _check(self, name: str, known: _Known | None) -> StoredPatch | None:
        """Read the task's pointer from the bucket; while the bucket is unreachable, what was last seen."""
        try:
            raw, pointer_etag = self.objects.get_bytes(_pointer_key(name), MAX_POINTER_BYTES)
        except FileNotFoundError:
            self._remember(name, None, None, None)
            return None
        except StoreUnavailable:
            if known is not None:
                return known.stored
            raise
        except ValueError:  # a pointer too large to be ours
            raw, pointer_etag = b"", "oversized"
        if known is not None and known.pointer_etag == pointer_etag:
            with self._lock:
                known.checked_at = time.monotonic()
            return known.stored
        pointer = _parse_pointer(raw)
        if pointer is None:
            # still a task (its pointer exists), but one that cannot be served: fetch and read_header say why
            stored = StoredPatch(name, f"unreadable-{pointer_etag}", 0, "")
        else:
            stored = StoredPatch(name, pointer["sha256"], pointer["size"], str(pointer.get("stored_at", "")))
        self._remember(name, stored, pointer, pointer_etag)
        return stored

    def _current(self, name: str) -> tuple[StoredPatch, dict[str, Any] | None]:
        """The task's version and pointer as this process last saw them (read from the bucket when stale)."""
        stored = self.stat(name)
        with self._lock:
            known = self._known.get(name)
        if stored is not None and (known is None or known.stored != stored):  # a notice dropped it meanwhile
            stored = self._check(name, None)
            with self._lock:
                known = self._known.get(name)
        if stored is None or known is None:
            raise TaskNotFound(f"task {name!r} not found")
        return stored, known.pointer

    def _fresh_sha(self, name: str) -> str | None:
        """The sha256 the bucket's pointer names right now (not what is remembered): what a write replaces."""
        try:
            raw, _ = self.objects.get_bytes(_pointer_key(name), MAX_POINTER_BYTES)
        except FileNotFoundError:
            return None
        pointer = _parse_pointer(raw)
        return pointer["sha256"] if pointer is not None else None

    def _remember(
        self, name: str, stored: StoredPatch | None, pointer: dict[str, Any] | None, pointer_etag: str | None
    ) -> None:
        with self._lock:
            self._known.pop(name, None)  # re-inserted last: dict order is the order of last news
            self._known[name] = _Known(stored, pointer, pointer_etag, time.monotonic())
            if stored is None:
                self._absent += 1
                if self._absent > MAX_ABSENT_REMEMBERED:
                    self._forget_oldest_absent()

    def _forget_oldest_absent(self) -> None:
        """Drop the older half of the absent entries (called under the lock)."""
        absent = [name for name, known in self._known.items() if known.stored is None]
        for name in absent[: len(absent) // 2]:
            del self._known[name]
        self._absent = len(absent) - len(absent) // 2

    def _delete_quietly(self, keys: list[str]) -> None:
        """Remove objects nothing points at any more; one left behind (bucket down) is garbage, never a task."""
        if not keys:
            return
        try:
            self.objects.delete(keys)
        except (StoreUnavailable, OSError) as exc:
            log.warning("could not remove %d superseded object(s): %s", len(keys), exc)


def _pointer_key(name: str) -> str:
    return f"tasks/{name}.json"


def _patch_key(name: str, sha: str) -> str:
    return f"patches/{name}/{sha}.safetensors"


def _parse_pointer(raw: bytes) -> dict[str, Any] | None:
    """A pointer as this code writes it, or None: one written by anything else is never trusted for a key."""
    try:
        pointer = loads_bounded(raw, max_depth=MAX_JSON_DEPTH)
    except (BoundedJSONError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(pointer, dict):
        return None
    sha, size = pointer.get("sha256"), pointer.get("size")
    if not isinstance(sha, str) or not SHA256_PATTERN.fullmatch(sha):
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return None
    return pointer


def open_task_store(settings: Settings) -> TaskStore:
    """The store ``SKILLGRAFT_STORE_URL`` names: a local folder (``file://``, the default ``store_dir``) or an
    S3-compatible bucket (``s3://bucket/prefix``), which keeps its local files (cache, staging) in ``store_dir``."""
    url = settings.store_url
    if url is None or url.startswith("file://"):
        return LocalTaskStore(settings.store_dir)
    objects = S3Objects(
        S3Location.parse(url), timeout_s=settings.store_timeout_s, addressing_style=settings.s3_addressing_style
    )
    return ObjectTaskStore(
        objects,
        settings.store_dir,
        settings.store_cache_dir,
        settings.store_cache_bytes,
        settings.store_recheck_s,
    )
