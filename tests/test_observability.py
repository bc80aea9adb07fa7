"""Metrics, request ids and truncation notices, seen from outside through the real app."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.grafting.base import BaseModel
from app.grafting.heads import Example, HeadSpec, Tokenization
from app.grafting.patch import save_patch
from app.main import create_app
from tests.utils.tiny import make_patch

LONG = " ".join(["remarkably"] * 400)


@pytest.fixture
def client(tiny_base: BaseModel, tiny_base_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    save_patch(make_patch(tiny_base, task="obs"), tmp_path / "tasks/obs/patch.safetensors")
    save_patch(make_patch(tiny_base, task="obs-cls", mode="classifier"), tmp_path / "tasks/obs-cls/patch.safetensors")
    settings = Settings(base_model=tiny_base_dir, store_dir=tmp_path, max_batch_wait_ms=1, max_length=64)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_truncation_flags(tiny_base: BaseModel) -> None:
    prompt = Tokenization(
        tiny_base.tokenizer, HeadSpec("prompt", ("a", "b"), "{text} It was {mask} .", ("bad", "good")), 32
    )
    classifier = Tokenization(
        tiny_base.tokenizer, HeadSpec("classifier", ("a", "b"), classifier_kind="bert-pooler"), 32
    )
    for tokenization in (prompt, classifier):
        short, long = tokenization.encode(Example("fine", 0)), tokenization.encode(Example(LONG, 0))
        assert not short.truncated and long.truncated
        assert len(long.input_ids) == 32
    assert prompt.encode(Example(LONG, 0)).read_position >= 0, "the mask survives truncation"


def test_truncation_is_stated_in_the_response(client: TestClient) -> None:
    body = {"tasks": ["obs", "obs-cls"], "inputs": ["a short one", LONG]}
    results = client.post("/v1/classify", json=body).json()["results"]
    for result in results:
        assert [p["truncated"] for p in result["predictions"]] == [False, True]


def metric(text: str, sample: str) -> float:
    """The value of one sample line (metrics are per process, so tests compare before and after)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_and_request_ids(client: TestClient) -> None:
    before = client.get("/metrics").text
    response = client.post(
        "/v1/classify",
        json={"tasks": ["obs", "obs-cls"], "inputs": ["x", "y", "z"]},
        headers={"X-Request-ID": "trace-0001"},
    )
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-0001"
    generated = client.get("/v1/tasks").headers["x-request-id"]
    assert len(generated) == 32
    assert client.get("/v1/tasks", headers={"X-Request-ID": "bad id\n"}).headers["x-request-id"] != "bad id\n"
    text = client.get("/metrics").text
    assert 'skillgraft_http_requests_total{method="POST",route="/v1/classify",status="200"}' in text
    for task in ("obs", "obs-cls"):
        sample = f'skillgraft_classified_inputs_total{{task="{task}"}}'
        assert metric(text, sample) - metric(before, sample) == 3.0
    assert "skillgraft_batch_size_count" in text
    # a batch's busy time is added just after its rows are answered: give the last one a moment to land
    busy = "skillgraft_engine_busy_seconds_total"
    deadline = time.monotonic() + 10
    while metric(text, busy) <= metric(before, busy) and time.monotonic() < deadline:
        time.sleep(0.05)
        text = client.get("/metrics").text
    assert metric(text, busy) > metric(before, busy)
    assert 'skillgraft_patch_swap_seconds_count{phase="apply"}' in text or 'path="mixed"' in text
    assert "skillgraft_patch_cache_tasks 2.0" in text
    assert 'skillgraft_jobs{state="queued"} 0.0' in text
