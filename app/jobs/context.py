"""What every job function runs with and reports through, whatever its kind (localize, stitch).

A ``JobContext`` holds the long-lived pieces of one runner process: the base model loaded once, the task store and
the job store. The base given here must be the runner's own copy: a localize job writes into it while it works.
The helpers below are the record changes every job kind makes the same way: start, cancellation check, storing a
task patch, finish.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.store import LocalTaskStore, StoredPatch
from app.grafting.base import BaseModel
from app.grafting.patch import GraftPatch, load_patch, patch_to_bytes, validate_for_base
from app.jobs.inputs import UploadPaths
from app.jobs.models import JobRecord, JobState, utc_now
from app.jobs.store import JobStore


@dataclass
class JobContext:
    base_loader: Callable[[], BaseModel]
    tasks: LocalTaskStore
    jobs: JobStore
    uploads_dir: Path
    # hours a failed job's upload stays for inspection; 0 deletes it when the job fails
    failed_upload_retention_h: float = 72.0
    # called with a task name after it is (re)written, e.g. to publish a notice to other replicas
    on_task_written: Callable[[str], None] | None = None
    # named datasets folder for jobs that score on them (None: the default beside the repository)
    data_dir: Path | None = None
    _base: BaseModel | None = None

    @property
    def base(self) -> BaseModel:
        if self._base is None:
            self._base = self.base_loader()
        return self._base

    def upload_paths(self, job_id: str) -> UploadPaths:
        return UploadPaths(self.uploads_dir / job_id)


class Phases:
    """Wall time per phase, recorded into the job as it goes."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._started = time.perf_counter()
        self._phase: str | None = None

    def enter(self, phase: str) -> None:
        now = time.perf_counter()
        if self._phase is not None:
            self.timings[self._phase] = round(now - self._started, 4)
        self._phase, self._started = phase, now

    def close(self) -> dict[str, float]:
        self.enter("done")
        return self.timings


def start(ctx: JobContext, record: JobRecord, total: int) -> None:
    """Mark one attempt of the job running, in its first phase (``load``) with ``total`` steps ahead."""
    ctx.jobs.update(
        record.id,
        state=JobState.running,
        started_at=utc_now(),
        attempts=record.attempts + 1,
        progress={"phase": "load", "step": 0, "total": total},
    )


def is_cancelled(ctx: JobContext, job_id: str) -> bool:
    """Whether the job was cancelled meanwhile (by an API replica): running jobs poll this between steps."""
    current = ctx.jobs.get(job_id)
    return current is not None and current.state == JobState.cancelled


def store_task(ctx: JobContext, base: BaseModel, patch: GraftPatch, job_id: str) -> StoredPatch:
    """Write ``patch`` into the task store under its task name, validated against ``base`` before the rename."""

    def validate(path: Path) -> None:
        validate_for_base(load_patch(path), base)

    stored = ctx.tasks.write_patch(patch.task, patch_to_bytes(patch), validate, source=f"job:{job_id}")
    if ctx.on_task_written is not None:
        ctx.on_task_written(patch.task)
    return stored


def finish(
    ctx: JobContext,
    job_id: str,
    state: JobState,
    phases: Phases,
    result: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    ctx.jobs.update(
        job_id,
        state=state,
        result=result,
        error=error,
        finished_at=utc_now(),
        timings=phases.close(),
        progress={"phase": state.value},
    )
    if state == JobState.failed and ctx.failed_upload_retention_h <= 0:
        shutil.rmtree(ctx.upload_paths(job_id).folder, ignore_errors=True)
