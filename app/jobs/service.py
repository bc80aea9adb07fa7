"""Job submission and lookup below HTTP: the API routes and the CLI call these, never the runners directly.

Every job kind enters through one door, ``JobService.enqueue``: reuse of an identical job, the name check and claim,
the queued-job limit over all kinds, the record, the runner, and a clean ``QueueUnavailable`` when Redis is down.
``JobService.submit`` (uploads to localize) and ``StitchService.submit`` only build the request.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from app.config import Settings
from app.core.errors import LimitExceeded, Overloaded, ServiceError, TaskNotFound
from app.core.object_store import open_task_store
from app.core.store import TaskStore
from app.core.store_sync import TASK_CHANNEL as TASK_CHANNEL
from app.core.store_sync import RedisAnnouncer
from app.grafting.base import BaseModel, load_base
from app.grafting.checkpoint import CheckpointBaseMismatch, PickledCheckpoint
from app.jobs.context import JobContext
from app.jobs.errors import (
    CheckpointFromOtherBase,
    InvalidUpload,
    JobNotFound,
    QueueUnavailable,
    TaskExists,
    UnsupportedUpload,
)
from app.jobs.inputs import UploadError, UploadPaths, load_job_inputs, upload_limits
from app.jobs.models import JobRecord, JobState, StitchSpec, TaskSpec, job_id_for, stitch_job_id
from app.jobs.runner import InProcessRunner, JobRunner, RQRunner
from app.jobs.stitching import StitchedModels
from app.jobs.store import FileJobStore, JobStore, RedisJobStore
from app.jobs.work import sweep_failed_uploads

log = logging.getLogger("skillgraft.jobs")
# TASK_CHANNEL (re-exported here): a worker publishes a ``TaskNotice`` on it after a job (re)writes a task; each API
# replica's ``StoreSync`` (wired in ``app.main``) subscribes. It lives in ``app.core.store_sync`` because the engine
# side may not import ``app.jobs``.
CHUNK = 1 << 20


class Staging:
    """One upload being received: files stream into a private folder with a running size count and hashes."""

    def __init__(self, uploads_dir: Path, max_bytes: int) -> None:
        self.folder = uploads_dir / f".incoming-{uuid.uuid4().hex}"
        self.folder.mkdir(parents=True)
        self.max_bytes = max_bytes
        self.received = 0
        self.hashes: dict[str, str] = {}

    def save(self, name: str, source: BinaryIO) -> Path:
        target = self.folder / name
        digest = hashlib.sha256()
        with target.open("wb") as out:
            while block := source.read(CHUNK):
                self.received += len(block)
                if self.received > self.max_bytes:
                    raise LimitExceeded(f"upload is larger than max_upload_bytes={self.max_bytes}")
                digest.update(block)
                out.write(block)
        self.hashes[name] = digest.hexdigest()
        return target

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _nothing() -> None:
    """A request hook with nothing to do."""


@dataclass(frozen=True)
class JobRequest:
    """One job to queue, as each job kind hands it to ``JobService.enqueue``."""

    record: JobRecord
    # raises TaskExists while the record's name is taken: run before ``validate`` (fail fast) and again under the
    # name claim (the check that counts)
    check_name: Callable[[], None]
    # the costly checks of the job's inputs (an upload's checkpoint and data), outside the claim
    validate: Callable[[], None] = _nothing
    # moves the job's inputs to where its runner reads them, under the claim, just before the record is stored
    place_inputs: Callable[[], None] = _nothing


# How each kind of refused upload is answered (the HTTP status of each type: app.api.errors).
UPLOAD_ERRORS: dict[type[Exception], type[InvalidUpload]] = {
    PickledCheckpoint: UnsupportedUpload,
    CheckpointBaseMismatch: CheckpointFromOtherBase,
}
# Deleting old failed uploads lists the whole uploads area (a bucket, with an object store): at most this often.
SWEEP_INTERVAL_S = 600.0


class JobService:
    """The job door: validates uploads with the serving base (read only), queues jobs of every kind through
    ``enqueue`` (records in the job store, ids to the runner), looks jobs up and cancels them."""

    def __init__(
        self, settings: Settings, base: BaseModel, tasks: TaskStore, jobs: JobStore, runner: JobRunner
    ) -> None:
        self.settings = settings
        self.base = base
        self.tasks = tasks
        self.jobs = jobs
        self.runner = runner
        # where uploads are received on this machine; a job's upload then moves into the task store (put_upload)
        self.uploads_dir = settings.store_dir / "uploads"
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self._claims_lock = threading.Lock()
        self._last_sweep = -SWEEP_INTERVAL_S

    @property
    def backend(self) -> str:
        return self.runner.backend

    def staging(self) -> Staging:
        return Staging(self.uploads_dir, self.settings.max_upload_bytes)

    def submit(self, staging: Staging, spec: TaskSpec) -> tuple[JobRecord, bool]:
        """Validate a received upload and queue its job. Returns (record, created); an identical earlier
        submission returns its job (or the finished task's job) instead of a new one."""
        try:
            return self._submit(staging, spec)
        finally:
            staging.discard()

    def _submit(self, staging: Staging, spec: TaskSpec) -> tuple[JobRecord, bool]:
        checkpoint_name = next((n for n in staging.hashes if n.startswith("checkpoint")), None)
        train_name = next((n for n in staging.hashes if n.startswith("train")), None)
        if checkpoint_name is None or train_name is None:
            raise InvalidUpload("checkpoint" if checkpoint_name is None else "train", "is required")
        dev_name = next((n for n in staging.hashes if n.startswith("dev")), None)
        job_id = job_id_for(
            staging.hashes[checkpoint_name],
            staging.hashes[train_name],
            staging.hashes.get(dev_name) if dev_name else None,
            spec,
        )
        request = JobRequest(
            JobRecord(id=job_id, task=spec.task, spec=spec),
            check_name=lambda: self._check_name_free(spec),
            validate=lambda: self._validate_upload(staging, spec),
            place_inputs=lambda: self._place_upload(staging, job_id),
        )
        record, created = self.enqueue(request)
        if created:
            self._sweep_now_and_then()
        return record, created

    def _sweep_now_and_then(self) -> None:
        """Delete expired failed uploads, at most every ``SWEEP_INTERVAL_S``; the job is already queued, so a
        store that cannot be listed right now must not turn its 202 into an error."""
        now = time.monotonic()
        if now - self._last_sweep < SWEEP_INTERVAL_S:
            return
        self._last_sweep = now
        try:
            sweep_failed_uploads(self._sweeper_context())
        except Exception:
            log.warning("sweeping failed uploads failed; will try again later", exc_info=True)

    def _validate_upload(self, staging: Staging, spec: TaskSpec) -> None:
        (staging.folder / "spec.json").write_text(spec.model_dump_json())
        try:
            limits = upload_limits(self.settings)
            load_job_inputs(UploadPaths(staging.folder), spec, self.base, staging.folder / "extracted", limits)
        except UploadError as exc:
            error = UPLOAD_ERRORS.get(type(exc.__cause__), InvalidUpload)
            raise error(exc.field, exc.message) from exc
        shutil.rmtree(staging.folder / "extracted", ignore_errors=True)

    def _place_upload(self, staging: Staging, job_id: str) -> None:
        # a folder rename for a local store; streamed parts, manifest last, for an object store
        self.tasks.put_upload(job_id, staging.folder)

    def enqueue(self, request: JobRequest) -> tuple[JobRecord, bool]:
        """Queue one job of any kind. Returns (record, created): an earlier job with the same id that has not
        failed or been cancelled is returned instead of a new one. Raises TaskExists (name taken), Overloaded
        (``max_queued_jobs`` jobs of any kind queued) or QueueUnavailable (the job store or queue is down)."""
        record = request.record
        existing = self._jobs_call(self.jobs.get, record.id)
        if existing is not None and existing.state not in (JobState.failed, JobState.cancelled):
            return existing, False
        request.check_name()
        request.validate()
        # Check and create under one claim on the name, so of two concurrent submissions for one name (on any
        # replica) exactly one gets a job and the other a 409.
        with self._name_claim(record.task):
            request.check_name()
            self._check_queue_room()
            request.place_inputs()
            if existing is not None:
                self._jobs_call(self.jobs.delete, record.id)
            self._jobs_call(self.jobs.create, record)
        try:
            self.runner.submit(record.id)
        except Exception as exc:
            self._jobs_call(self.jobs.update, record.id, state=JobState.failed, error=f"could not queue: {exc}")
            raise QueueUnavailable(f"the job queue is unavailable: {exc}") from exc
        return record, True

    def _check_queue_room(self) -> None:
        limit = self.settings.max_queued_jobs
        queued = len(self._jobs_call(self.jobs.list, JobState.queued, limit + 1))
        if queued >= limit:
            raise Overloaded(f"{queued} jobs are queued (max_queued_jobs={limit})")

    def check_no_active_job(self, name: str) -> None:
        """TaskExists while a queued or running job (of any kind) carries ``name``."""
        active = [
            record
            for state in (JobState.queued, JobState.running)
            for record in self._jobs_call(self.jobs.list, state, 10_000)
            if record.task == name
        ]
        if active:
            raise TaskExists(f"task {name!r} already has a {active[0].state.value} job ({active[0].id})")

    def _check_name_free(self, spec: TaskSpec) -> None:
        self.check_no_active_job(spec.task)
        if self.tasks.stat(spec.task) is not None and not spec.replace:
            raise TaskExists(f"task {spec.task!r} exists; submit with replace=true to replace it")

    @contextlib.contextmanager
    def _name_claim(self, task: str) -> Iterator[None]:
        """Mutual exclusion per job name: a process lock, plus a short Redis lock when jobs live in Redis."""
        with self._claims_lock:
            redis = getattr(self.jobs, "redis", None)
            if redis is None:
                yield
                return
            key = f"skillgraft:claim:{task}"
            token = uuid.uuid4().hex
            deadline = time.monotonic() + 10
            while not self._jobs_call(redis.set, key, token, nx=True, px=10_000):
                if time.monotonic() > deadline:
                    raise TaskExists(f"task {task!r} is being submitted by another request; try again")
                time.sleep(0.01)
            try:
                yield
            finally:
                if self._jobs_call(redis.get, key) in (token, token.encode()):
                    self._jobs_call(redis.delete, key)

    def get(self, job_id: str) -> JobRecord:
        record = self._jobs_call(self.jobs.get, job_id) if job_id.isalnum() else None
        if record is None:
            raise JobNotFound(f"job {job_id[:64]!r} not found")
        return record

    def list(self, state: JobState | None = None, limit: int = 50) -> list[JobRecord]:
        return self._jobs_call(self.jobs.list, state, limit)

    def cancel(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        if record.state.finished:
            return record
        updated = self._jobs_call(self.jobs.update, job_id, state=JobState.cancelled, error="cancelled")
        try:
            self.runner.cancel(job_id)
        except Exception:  # the record already says cancelled; a running job stops at its next step
            log.exception("runner could not cancel %s", job_id)
        return updated or record

    def _jobs_call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except ServiceError:
            raise
        except (ConnectionError, OSError) as exc:
            # strerror, not str(exc): an OSError's text names the file, and clients never see server paths
            reason = exc.strerror or type(exc).__name__
            raise QueueUnavailable(f"the job store is unavailable: {reason}") from exc
        except Exception as exc:
            if type(exc).__module__.startswith("redis"):
                raise QueueUnavailable(f"the job store (Redis) is unavailable: {exc}") from exc
            raise

    def _sweeper_context(self) -> JobContext:
        return JobContext(
            lambda: self.base,
            self.tasks,
            self.jobs,
            failed_upload_retention_h=self.settings.keep_failed_uploads_h,
        )


class StitchService:
    """Submits stitch jobs through the job door (``JobService.enqueue``); reads finished stitched models back."""

    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs
        self.models = StitchedModels(jobs.tasks)

    def submit(self, spec: StitchSpec) -> tuple[JobRecord, bool]:
        """Queue a stitch job; an identical earlier submission (same spec, same stored patches) returns its job."""
        etags = []
        for task in spec.tasks:
            stored = self.jobs.tasks.stat(task)
            if stored is None:
                raise TaskNotFound(f"task {task!r} not found")
            etags.append(stored.etag)
        record = JobRecord(id=stitch_job_id(spec, etags), kind="stitch", task=spec.name, params=spec.model_dump())
        return self.jobs.enqueue(JobRequest(record, check_name=lambda: self._check_name_free(spec)))

    def _check_name_free(self, spec: StitchSpec) -> None:
        self.jobs.check_no_active_job(spec.name)
        if self.models.exists(spec.name) and not spec.replace:
            raise TaskExists(f"stitched model {spec.name!r} exists; submit with replace=true to replace it")


def connect_redis(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=30)


def build_worker_context(settings: Settings, base: BaseModel | None = None) -> JobContext:
    """The context an RQ worker process runs jobs with: its own base, the shared task store (a folder or a bucket),
    the Redis job store, and notices to the API replicas on every task it writes."""
    if settings.redis_url is None:
        raise ValueError("a worker needs SKILLGRAFT_REDIS_URL")
    redis = connect_redis(settings.redis_url)
    loaded = base

    def loader() -> BaseModel:
        return loaded if loaded is not None else load_base(settings.base_model, settings.device)

    return JobContext(
        base_loader=loader,
        tasks=open_task_store(settings),
        jobs=RedisJobStore(redis),
        failed_upload_retention_h=settings.keep_failed_uploads_h,
        data_dir=settings.data_dir,
        announce=RedisAnnouncer(redis),
    )


def build_job_service(settings: Settings, base: BaseModel, tasks: TaskStore) -> JobService:
    """The backend the settings choose: RQ on Redis when ``redis_url`` is set, else the in-process runner
    (which loads its own copy of the base on its first job: localization writes into the base it uses)."""
    if settings.redis_url:
        redis = connect_redis(settings.redis_url)
        jobs: JobStore = RedisJobStore(redis)
        runner: JobRunner = RQRunner(redis, settings.job_timeout_s, settings.job_retries)
        return JobService(settings, base, tasks, jobs, runner)
    jobs = FileJobStore(settings.store_dir / "jobs")
    ctx = JobContext(
        base_loader=lambda: load_base(settings.base_model, settings.device),
        tasks=tasks,
        jobs=jobs,
        failed_upload_retention_h=settings.keep_failed_uploads_h,
        data_dir=settings.data_dir,
    )
    in_process = InProcessRunner(ctx)
    resumed = in_process.resume_unfinished()
    if resumed:
        log.info("resumed %d unfinished job(s): %s", len(resumed), ", ".join(resumed))
    return JobService(settings, base, tasks, jobs, in_process)
