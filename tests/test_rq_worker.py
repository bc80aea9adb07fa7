"""RQ on a real Redis with real worker processes: a job runs in a worker, and a worker killed with SIGKILL
mid-job has its job finished exactly once by another worker."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import Settings
from app.core.store import LocalTaskStore
from app.grafting.base import BaseModel
from app.jobs.models import JobRecord, JobState
from app.jobs.service import JobService, build_job_service, connect_redis
from tests.utils.processes import Processes
from tests.utils.uploads import jsonl, spec, stage, write_checkpoint

REDIS_URL = os.environ.get("SKILLGRAFT_TEST_RQ_REDIS_URL", "redis://127.0.0.1:6379/14")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def rq_env(tiny_base_dir: Path, tmp_path: Path) -> dict[str, str]:
    redis = connect_redis(REDIS_URL)
    try:
        redis.ping()
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.fail(f"Redis at {REDIS_URL} is not answering ({exc}); scripts/test.sh starts one")
    redis.flushdb()
    return {
        **os.environ,
        "SKILLGRAFT_REDIS_URL": REDIS_URL,
        "SKILLGRAFT_STORE_DIR": str(tmp_path / "store"),
        "SKILLGRAFT_BASE_MODEL": str(tiny_base_dir),
        # short lease and maintenance interval so an abandoned job is found within seconds, not minutes
        "SKILLGRAFT_JOB_LEASE_S": "3",
        "SKILLGRAFT_WORKER_MAINTENANCE_S": "1",
        "PYTHONPATH": str(REPO),
    }


@pytest.fixture
def service(rq_env: dict[str, str], tiny_base: BaseModel) -> Iterator[JobService]:
    settings = Settings(
        redis_url=rq_env["SKILLGRAFT_REDIS_URL"],
        store_dir=Path(rq_env["SKILLGRAFT_STORE_DIR"]),
        base_model=Path(rq_env["SKILLGRAFT_BASE_MODEL"]),
    )
    svc = build_job_service(settings, tiny_base, LocalTaskStore(settings.store_dir))
    yield svc
    svc.runner.close()


@pytest.fixture
def workers(rq_env: dict[str, str], tmp_path: Path) -> Iterator[Processes]:
    pool = Processes(rq_env, tmp_path)
    yield pool
    pool.stop_all()


def wait_state(
    service: JobService, job_id: str, states: set[JobState], timeout: float, workers: Processes
) -> JobRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = service.get(job_id)
        if record.state in states:
            return record
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} is {service.get(job_id).state}, not {states}\n{workers.logs()}")


@pytest.mark.slow
def wait_removed(path: Path, timeout: float = 10) -> bool:
    """The worker deletes a job's upload just after marking it succeeded: a poller can see the state first."""
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not path.exists()


def test_worker_process_runs_job(service: JobService, workers: Processes, tiny_base: BaseModel, tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tiny_base, tmp_path / "ckpt")
    record, created = service.submit(stage(service, checkpoint, jsonl(), jsonl(8)), spec("rq-task"))
    assert created and service.backend == "rq"
    workers.worker()
    done = wait_state(service, record.id, {JobState.succeeded, JobState.failed}, 120, workers)
    assert done.state == JobState.succeeded, (done.error, workers.logs())
    assert service.tasks.list_names() == ["rq-task"]
    assert wait_removed(service.uploads_dir / record.id)


@pytest.mark.slow
def test_sigkill_mid_job_runs_again_once(
    service: JobService, workers: Processes, tiny_base: BaseModel, tmp_path: Path
) -> None:
    checkpoint = write_checkpoint(tiny_base, tmp_path / "ckpt")
    record, _ = service.submit(stage(service, checkpoint, jsonl(32), jsonl(16)), spec("survivor", steps=60))
    first = workers.worker()
    running = wait_state(service, record.id, {JobState.running}, 120, workers)
    # let it get well into localization before pulling the plug
    deadline = time.monotonic() + 60
    while service.get(record.id).progress.step < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.get(record.id).state == JobState.running, workers.logs()
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    killed_at = time.monotonic()
    workers.worker()
    done = wait_state(service, record.id, {JobState.succeeded, JobState.failed}, 240, workers)
    assert done.state == JobState.succeeded, (done.error, workers.logs())
    assert done.attempts == running.attempts + 1 == 2
    assert time.monotonic() - killed_at < 120
    assert service.tasks.list_names() == ["survivor"]
    assert list(service.tasks.staging_dir.iterdir()) == [], "no partial files"
    assert wait_removed(service.uploads_dir / record.id)
