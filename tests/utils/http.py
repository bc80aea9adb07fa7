"""HTTP helpers for end-to-end tests against real servers: upload a checkpoint, follow a job, classify."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from tests.utils.processes import Processes
from tests.utils.uploads import PROMPT, jsonl

JOB_SPEC = {
    "task": "films",
    "mode": "prompt",
    "template": PROMPT.template,
    "label_words": list(PROMPT.label_words or ()),
    "sparsity": 0.01,
    "steps": 2,
}
FINISHED = frozenset({"succeeded", "failed", "cancelled"})


def upload(
    url: str, checkpoint: Path, spec: dict, train: bytes | None = None, dev: bytes | None = None
) -> httpx.Response:
    files = {
        "checkpoint": ("model.safetensors", checkpoint.read_bytes(), "application/octet-stream"),
        "train": ("train.jsonl", train if train is not None else jsonl(), "application/jsonl"),
    }
    if dev is not None:
        files["dev"] = ("dev.jsonl", dev, "application/jsonl")
    return httpx.post(url + "/v1/tasks", files=files, data={"spec": json.dumps(spec)}, timeout=120)


def wait_job(url: str, job_id: str, procs: Processes, timeout: float = 120, states: frozenset[str] = FINISHED) -> dict:
    """Poll a job until it is in one of ``states`` (a 503 while the queue is down is waited out)."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10)
        if response.status_code == 200:
            job = response.json()
            if job["state"] in states:
                return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached {sorted(states)}: {job}\n{procs.logs()}")


def classify(url: str, task: str) -> httpx.Response:
    body = {"task": task, "inputs": ["a great film", "an awful film"], "return_probabilities": True}
    return httpx.post(url + "/v1/classify", json=body, timeout=30)
