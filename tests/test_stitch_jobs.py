"""Stitch jobs go through the same job door as uploads: a Redis outage answers 503 for both, the queued-job limit
counts every kind (429), and the name check and claim hold for stitched models too."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.core.errors import Overloaded
from app.core.store import LocalTaskStore
from app.grafting.base import BaseModel
from app.grafting.patch import patch_to_bytes
from app.jobs.errors import QueueUnavailable, TaskExists
from app.jobs.models import JobState, StitchSpec
from app.jobs.service import JobService, StitchService
from app.jobs.store import FileJobStore
from app.main import create_app
from tests.utils.http import JOB_SPEC
from tests.utils.processes import free_port
from tests.utils.tiny import make_patch
from tests.utils.uploads import jsonl, write_checkpoint

MEMBERS = ("alpha", "beta")


class HoldingRunner:
    """A runner that takes jobs and never runs them: submitted jobs stay queued for as long as a test needs."""

    backend = "holding"

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def submit(self, job_id: str) -> None:
        self.submitted.append(job_id)

    def cancel(self, job_id: str) -> None:
        """Nothing runs, so there is nothing to stop."""

    def close(self) -> None:
        """Nothing to release."""


class UnreachableQueue(HoldingRunner):
    """A runner whose queue is down: every submission raises like a lost Redis connection."""

    def submit(self, job_id: str) -> None:
        raise ConnectionError("Connection refused")


def stitch_body(name: str = "combo", **fields: object) -> dict[str, object]:
    return {"name": name, "tasks": list(MEMBERS), "eval_limit": 0, **fields}


def put_members(client: TestClient, base: BaseModel) -> None:
    for seed, task in enumerate(MEMBERS, 1):
        response = client.put(f"/v1/tasks/{task}/patch", content=patch_to_bytes(make_patch(base, task, seed=seed)))
        assert response.status_code == 201, response.text


def post_upload(client: TestClient, checkpoint: Path, task: str) -> object:
    files = {
        "checkpoint": ("model.safetensors", checkpoint.read_bytes(), "application/octet-stream"),
        "train": ("train.jsonl", jsonl(), "application/jsonl"),
    }
    return client.post("/v1/tasks", files=files, data={"spec": json.dumps({**JOB_SPEC, "task": task})})


@pytest.fixture
def checkpoint(tiny_base: BaseModel, tmp_path: Path) -> Path:
    return write_checkpoint(tiny_base, tmp_path / "ckpt")


def test_redis_down_answers_503_for_stitch_like_uploads(
    tiny_base: BaseModel, tiny_base_dir: Path, tmp_path: Path, checkpoint: Path
) -> None:
    # a port nothing listens on: the shared Redis server is left alone
    settings = Settings(
        base_model=tiny_base_dir, store_dir=tmp_path / "store", redis_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    with TestClient(create_app(settings)) as client:
        put_members(client, tiny_base)
        upload = post_upload(client, checkpoint, "later")
        stitched = client.post("/v1/stitch", json=stitch_body())
        for response in (upload, stitched):
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "queue_unavailable"
            assert response.headers["retry-after"] == "1"
        assert client.post("/v1/classify", json={"task": "alpha", "inputs": ["a fine film"]}).status_code == 200
    assert not (tmp_path / "store/stitched").exists()


def test_queued_job_limit_counts_stitch_jobs(
    tiny_base: BaseModel, tiny_base_dir: Path, tmp_path: Path, checkpoint: Path
) -> None:
    settings = Settings(base_model=tiny_base_dir, store_dir=tmp_path / "store", max_queued_jobs=1)
    with TestClient(create_app(settings)) as client:
        jobs: JobService = client.app.state.jobs  # type: ignore[attr-defined]
        jobs.runner.close()
        jobs.runner = HoldingRunner()
        put_members(client, tiny_base)

        queued = client.post("/v1/stitch", json=stitch_body("first"))
        assert queued.status_code == 202, queued.text
        for refused in (client.post("/v1/stitch", json=stitch_body("second")), post_upload(client, checkpoint, "t")):
            assert refused.status_code == 429, refused.text
            assert "max_queued_jobs=1" in refused.json()["error"]["message"]
            assert refused.headers["retry-after"] == "1"

        assert client.delete(queued.json()["url"]).json()["state"] == "cancelled"
        uploaded = post_upload(client, checkpoint, "t")
        assert uploaded.status_code == 202, uploaded.text
        assert client.post("/v1/stitch", json=stitch_body("second")).status_code == 429


@pytest.fixture
def held_service(tiny_base: BaseModel, tmp_path: Path) -> Iterator[JobService]:
    settings = Settings(store_dir=tmp_path / "store")
    tasks = LocalTaskStore(settings.store_dir)
    for seed, task in enumerate(MEMBERS, 1):
        tasks.write_patch(task, patch_to_bytes(make_patch(tiny_base, task, seed=seed)), lambda path: None)
    yield JobService(settings, tiny_base, tasks, FileJobStore(settings.store_dir / "jobs"), HoldingRunner())


def test_stitch_name_is_claimed_while_its_job_is_active(held_service: JobService) -> None:
    stitching = StitchService(held_service)
    first, created = stitching.submit(StitchSpec.model_validate(stitch_body()))
    assert created and first.kind == "stitch" and first.state == JobState.queued
    assert stitching.submit(StitchSpec.model_validate(stitch_body())) == (first, False)
    with pytest.raises(TaskExists, match="already has a queued job"):
        stitching.submit(StitchSpec.model_validate(stitch_body(eval_limit=5)))
    held_service.cancel(first.id)
    second, created = stitching.submit(StitchSpec.model_validate(stitch_body(eval_limit=5)))
    assert created and second.id != first.id


def test_stitch_limit_and_queue_failure_through_the_service(held_service: JobService) -> None:
    stitching = StitchService(held_service)
    held_service.settings = held_service.settings.model_copy(update={"max_queued_jobs": 1})
    stitching.submit(StitchSpec.model_validate(stitch_body("one")))
    with pytest.raises(Overloaded, match="max_queued_jobs=1"):
        stitching.submit(StitchSpec.model_validate(stitch_body("two")))

    held_service.settings = held_service.settings.model_copy(update={"max_queued_jobs": 10})
    held_service.runner = UnreachableQueue()
    with pytest.raises(QueueUnavailable, match="job queue is unavailable"):
        stitching.submit(StitchSpec.model_validate(stitch_body("three")))
    failed = [r for r in held_service.list() if r.task == "three"]
    assert [r.state for r in failed] == [JobState.failed] and "could not queue" in (failed[0].error or "")
