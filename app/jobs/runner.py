"""Job runners: where job functions execute. Same functions, same records, two backends.

``run_job`` looks a record up and calls the job function of its kind (``JOB_FUNCTIONS``): every runner goes
through it, so a new job kind is one entry in that table.

* ``InProcessRunner`` (embedded default, no Redis): one daemon thread with its own copy of the base model,
  jobs run one at a time; unfinished jobs are picked up again when the process restarts.
* ``RQRunner`` (``SKILLGRAFT_REDIS_URL`` set): jobs go to an RQ queue on Redis and run in ``skillgraft worker``
  processes, with retries; a worker that dies mid-job stops renewing its lease and the job is run again by
  another worker (see ``workers/worker.py``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

from app.jobs.context import JobContext
from app.jobs.models import JobKind, JobRecord, JobState
from app.jobs.stitching import run_stitch_job
from app.jobs.work import run_localize_job

log = logging.getLogger("skillgraft.jobs")
QUEUE_NAME = "skillgraft"

JobFunction = Callable[[JobContext, JobRecord], dict[str, Any] | None]
JOB_FUNCTIONS: dict[JobKind, JobFunction] = {
    "localize": run_localize_job,
    "stitch": run_stitch_job,
}


def run_job(ctx: JobContext, job_id: str) -> dict[str, Any] | None:
    """Run one job to its end state with the function of its kind; a missing or finished record is skipped (a
    cancelled job still on a queue, or a retry of a job that finished meanwhile)."""
    record = ctx.jobs.get(job_id)
    if record is None or record.state.finished:
        return None
    return JOB_FUNCTIONS[record.kind](ctx, record)


class JobRunner(Protocol):
    backend: str

    def submit(self, job_id: str) -> None: ...

    def cancel(self, job_id: str) -> None: ...

    def close(self) -> None: ...


class InProcessRunner:
    """A single background thread running jobs in submission order."""

    backend = "in-process"

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="skillgraft-jobs", daemon=True)
        self._thread.start()

    def submit(self, job_id: str) -> None:
        self._queue.put(job_id)

    def cancel(self, job_id: str) -> None:
        """Nothing to do beyond the record: a queued job is skipped, a running one polls its state and stops."""

    def resume_unfinished(self) -> list[str]:
        """Re-submit jobs a previous process left queued or running (it died or was restarted mid-job)."""
        resumed = []
        for state in (JobState.running, JobState.queued):
            for record in self.ctx.jobs.list(state, limit=10_000):
                self.ctx.jobs.update(record.id, state=JobState.queued, progress={"phase": "queued"})
                self.submit(record.id)
                resumed.append(record.id)
        return resumed

    def close(self) -> None:
        self._queue.put(None)

    def _loop(self) -> None:
        while (job_id := self._queue.get()) is not None:
            try:
                run_job(self.ctx, job_id)
            except Exception as exc:  # the thread must survive any job
                log.exception("job %s failed", job_id)
                self.ctx.jobs.update(job_id, state=JobState.failed, error=f"internal error: {exc}")


class RQRunner:
    """Enqueue jobs on Redis for ``skillgraft worker`` processes."""

    backend = "rq"

    def __init__(self, redis: Any, timeout_s: int, retries: int) -> None:
        from rq import Queue

        self.redis = redis
        self.timeout_s = timeout_s
        self.retries = retries
        self.queue = Queue(QUEUE_NAME, connection=redis)

    def submit(self, job_id: str) -> None:
        from rq import Callback, Retry

        self.queue.enqueue(
            "app.jobs.rq_entry.run",
            job_id,
            job_id=job_id,
            job_timeout=self.timeout_s,
            retry=Retry(max=self.retries) if self.retries else None,
            on_failure=Callback("app.jobs.rq_entry.on_failure"),
            result_ttl=7 * 86400,
            failure_ttl=7 * 86400,
        )

    def cancel(self, job_id: str) -> None:
        from rq.exceptions import InvalidJobOperation, NoSuchJobError
        from rq.job import Job

        try:
            job = Job.fetch(job_id, connection=self.redis)
            if job.get_status() in ("queued", "deferred", "scheduled"):
                job.cancel()
        except (NoSuchJobError, InvalidJobOperation):
            pass

    def close(self) -> None:
        self.redis.close()
