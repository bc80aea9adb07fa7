"""Upload → job → classify through real uvicorn processes: the in-process default, and RQ with a real worker
process and two API replicas sharing Redis and one store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.grafting.base import BaseModel
from app.jobs.service import connect_redis
from tests.utils.http import JOB_SPEC, classify, upload, wait_job
from tests.utils.processes import Processes
from tests.utils.uploads import jsonl, write_checkpoint

REDIS_URL = os.environ.get("SKILLGRAFT_TEST_E2E_REDIS_URL", "redis://127.0.0.1:6379/12")


@pytest.fixture
def procs(tmp_path: Path, tiny_base_dir: Path) -> Iterator[Processes]:
    pool = Processes(
        {
            "SKILLGRAFT_STORE_DIR": str(tmp_path / "store"),
            "SKILLGRAFT_BASE_MODEL": str(tiny_base_dir),
            "SKILLGRAFT_MAX_BATCH_WAIT_MS": "1",
        },
        tmp_path,
    )
    yield pool
    pool.stop_all()


@pytest.mark.slow
def test_upload_job_classify_in_process(procs: Processes, tiny_base: BaseModel, tmp_path: Path) -> None:
    url = procs.server()
    checkpoint = write_checkpoint(tiny_base, tmp_path / "ckpt")
    assert classify(url, "films").status_code == 404
    response = upload(url, checkpoint, JOB_SPEC, dev=jsonl(8))
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == job["url"] == f"/v1/jobs/{job['id']}"
    done = wait_job(url, job["id"], procs, 120)
    assert done["state"] == "succeeded", done
    assert done["result"]["task"] == "films" and done["progress"]["phase"] == "succeeded"
    result = classify(url, "films")
    assert result.status_code == 200, result.text
    assert len(result.json()["results"][0]["predictions"]) == 2
    # same content again: the existing job, 200 not 202
    again = upload(url, checkpoint, {**JOB_SPEC, "replace": True}, dev=jsonl(8))
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    # name taken without replace -> 409, with a clear message
    taken = upload(url, checkpoint, JOB_SPEC, train=jsonl(20))
    assert taken.status_code == 409 and "replace=true" in taken.json()["error"]["message"]
    listed = httpx.get(url + "/v1/jobs", params={"state": "succeeded"}).json()
    assert [j["id"] for j in listed["items"]] == [job["id"]]
    assert httpx.get(url + "/v1/jobs/nosuchjob").status_code == 404


@pytest.mark.slow
def test_bad_uploads_over_http(procs: Processes, tiny_base: BaseModel, tmp_path: Path) -> None:
    url = procs.server()
    checkpoint = write_checkpoint(tiny_base, tmp_path / "ckpt")
    pickle = httpx.post(
        url + "/v1/tasks",
        data={"spec": json.dumps(JOB_SPEC)},
        files={
            "checkpoint": ("model.bin", b"\x80\x02}q\x00.", "application/octet-stream"),
            "train": ("train.jsonl", jsonl(), "application/jsonl"),
        },
    )
    assert pickle.status_code == 415 and "pickle" in pickle.json()["error"]["message"]
    bad_spec = upload(url, checkpoint, {**JOB_SPEC, "task": "../etc"})
    assert bad_spec.status_code == 422 and "task" in bad_spec.json()["error"]["message"]
    bad_data = upload(url, checkpoint, JOB_SPEC, train=b'{"text": "x"}')
    assert bad_data.status_code == 422 and "'label' is missing" in bad_data.json()["error"]["message"]
    missing = httpx.post(
        url + "/v1/tasks",
        data={"spec": json.dumps(JOB_SPEC)},
        files={"checkpoint": ("model.safetensors", checkpoint.read_bytes())},
    )
    assert missing.status_code == 422 and "train" in missing.json()["error"]["message"]
    store = tmp_path / "store"
    assert [p.name for p in (store / "uploads").iterdir()] == []
    assert list((store / "tasks").iterdir()) == []


@pytest.mark.slow
def test_two_replicas_serve_a_task_one_worker_finished(
    tmp_path: Path, tiny_base_dir: Path, tiny_base: BaseModel
) -> None:
    redis = connect_redis(REDIS_URL)
    redis.ping()
    redis.flushdb()
    procs = Processes(
        {
            "SKILLGRAFT_STORE_DIR": str(tmp_path / "store"),
            "SKILLGRAFT_BASE_MODEL": str(tiny_base_dir),
            "SKILLGRAFT_REDIS_URL": REDIS_URL,
            "SKILLGRAFT_WORKER_MAINTENANCE_S": "1",
            "SKILLGRAFT_MAX_BATCH_WAIT_MS": "1",
        },
        tmp_path,
    )
    try:
        first, second = procs.server(), procs.server()
        procs.worker()
        checkpoint = write_checkpoint(tiny_base, tmp_path / "ckpt")
        # both replicas have already looked the task up (and found nothing) before it exists
        assert classify(first, "films").status_code == 404 and classify(second, "films").status_code == 404
        response = upload(first, checkpoint, JOB_SPEC)
        assert response.status_code == 202, response.text
        done = wait_job(second, response.json()["id"], procs, 120)  # job records are shared through Redis
        assert done["state"] == "succeeded", (done, procs.logs())
        one, two = classify(first, "films"), classify(second, "films")
        assert one.status_code == two.status_code == 200, (one.text, two.text)
        assert one.json()["results"] == two.json()["results"]
    finally:
        procs.stop_all()


@pytest.mark.slow
def test_submit_cli_zips_a_folder_and_follows(procs: Processes, tiny_base: BaseModel, tmp_path: Path) -> None:
    url = procs.server()
    write_checkpoint(tiny_base, tmp_path / "ckpt")  # a folder: its config.json declares the prompt head
    (tmp_path / "train.jsonl").write_bytes(jsonl())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "submit",
            "--url",
            url,
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--train",
            str(tmp_path / "train.jsonl"),
            "--task",
            "from-cli",
            "--steps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=procs.env,
        cwd=procs.env["PYTHONPATH"],
    )
    assert result.returncode == 0, result.stderr + procs.logs()
    job = json.loads(result.stdout)
    assert job["state"] == "succeeded" and job["result"]["task"] == "from-cli"
    assert job["result"]["metrics"]["evaluated_on"] == "selection"  # too few examples to hold any out
    assert classify(url, "from-cli").status_code == 200
