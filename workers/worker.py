"""``skillgraft worker``: an RQ worker that loads the base once and runs localization jobs in its own process.

It runs jobs without forking (RQ's ``SimpleWorker``), so the base model stays loaded across jobs. A side thread
renews the job's lease every few seconds while it runs; a worker killed with SIGKILL stops renewing it, and the
maintenance pass of any other worker finds the expired lease and re-queues the job (RQ retries), which then
runs again from the start. Job results are idempotent: the patch is written under the task name by rename, so a
job that ran twice still leaves exactly one task.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from rq import Queue, SimpleWorker
from rq.worker import WorkerStatus

from app.config import Settings
from app.grafting.base import load_base
from app.jobs import rq_entry
from app.jobs.runner import QUEUE_NAME
from app.jobs.service import build_worker_context, connect_redis

log = logging.getLogger("skillgraft.worker")


class GraftWorker(SimpleWorker):
    """A non-forking worker whose running job holds a short, renewed lease instead of a timeout-long one."""

    lease_s: int = 30

    def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
        return self.lease_s

    def execute_job(self, job: Any, queue: Any) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()
        renew = threading.Thread(target=self._renew_lease, args=(job, execution, stop), daemon=True)
        renew.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            renew.join(timeout=5)
        self.set_state(WorkerStatus.IDLE)

    def _renew_lease(self, job: Any, execution: Any, stop: threading.Event) -> None:
        while not stop.wait(max(self.lease_s / 4, 0.5)):
            try:
                self.maintain_heartbeats(job, execution)
            except Exception:  # a missed renewal is retried; only a dead process lets the lease lapse
                log.warning("lease renewal for job %s failed", job.id, exc_info=True)


def run_worker(settings: Settings, burst: bool = False) -> bool:
    if not settings.redis_url:
        raise ValueError("skillgraft worker needs SKILLGRAFT_REDIS_URL (without it jobs run inside the API)")
    started = time.perf_counter()
    base = load_base(settings.base_model, settings.device)
    log.info("base %s loaded in %.1fs (fingerprint %s)", base.name, time.perf_counter() - started, base.fingerprint)
    rq_entry.CONTEXT = build_worker_context(settings, base)
    redis = connect_redis(settings.redis_url)
    GraftWorker.lease_s = settings.job_lease_s
    worker = GraftWorker(
        [Queue(QUEUE_NAME, connection=redis)],
        connection=redis,
        name=f"skillgraft-{socket.gethostname()}-{os.getpid()}",
        maintenance_interval=settings.worker_maintenance_s,
        # an idle worker wakes from its blocking dequeue at least this often to run maintenance
        worker_ttl=settings.worker_maintenance_s + 15,
    )
    return worker.work(burst=burst, logging_level="INFO", with_scheduler=False)
