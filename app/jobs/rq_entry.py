"""What RQ workers import: the job entry point and the failure callback.

The worker process sets ``CONTEXT`` once at start (base model loaded once, kept across jobs); a plain ``rq worker``
without it builds one from the settings on first use.
"""

from __future__ import annotations

import logging
from typing import Any

from app.config import get_settings
from app.jobs.context import JobContext
from app.jobs.models import JobState
from app.jobs.runner import run_job
from app.jobs.service import build_worker_context
from app.jobs.store import RedisJobStore

log = logging.getLogger("skillgraft.jobs")
CONTEXT: JobContext | None = None


def context() -> JobContext:
    global CONTEXT
    if CONTEXT is None:
        CONTEXT = build_worker_context(get_settings())
    return CONTEXT


def run(job_id: str) -> dict[str, Any] | None:
    return run_job(context(), job_id)


def on_failure(job: Any, connection: Any, exc_type: Any, exc_value: Any, tb: Any) -> None:
    """RQ calls this on a crash or an abandoned job (worker died); RQ retries while retries are left."""
    store = RedisJobStore(connection)
    reason = f"{getattr(exc_type, '__name__', exc_type)}: {exc_value}" if exc_value else str(exc_type)
    if job.retries_left:
        log.warning("job %s attempt failed (%s); %d retries left", job.id, reason, job.retries_left)
        store.update(
            job.id, state=JobState.queued, error=f"attempt failed ({reason}); retrying", progress={"phase": "queued"}
        )
    else:
        store.update(job.id, state=JobState.failed, error=reason)
