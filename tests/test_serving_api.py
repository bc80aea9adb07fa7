"""The REST API in-process (lifespan run): endpoints, errors in one shape, concurrency against references."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.engine.service import TextInput, softmax
from app.grafting.base import BaseModel
from app.grafting.patch import patch_to_bytes
from app.main import create_app
from tests.utils.serving import TEXTS, Reference, checksum
from tests.utils.tiny import make_patch

OCTET = {"Content-Type": "application/octet-stream"}


def settings_for(base_dir: Path, store: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"base_model": base_dir, "store_dir": store, "max_batch_wait_ms": 2.0, **overrides}
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def client(tiny_base_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(settings_for(tiny_base_dir, tmp_path, max_inputs_per_request=8, max_text_chars=200))
    with TestClient(app) as test_client:
        yield test_client


def put(client: TestClient, name: str, data: bytes) -> httpx.Response:
    return client.put(f"/v1/tasks/{name}/patch", content=data, headers=OCTET)


def assert_error(response: httpx.Response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    for word in words:
        assert word in body["error"]["message"]
    assert "Traceback" not in response.text


def test_probes_and_info(client: TestClient, tiny_base: BaseModel) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    info = client.get("/v1/info").json()
    assert info["base"]["fingerprint"] == tiny_base.fingerprint
    assert info["base"]["num_parameters"] == tiny_base.num_parameters and info["device"] == "cpu"
    assert info["limits"]["max_inputs_per_request"] == 8 and info["limits"]["max_text_chars"] == 200


def test_task_lifecycle_and_classify_matches_the_graft(client: TestClient, tiny_base: BaseModel) -> None:
    prompt, head = (
        make_patch(tiny_base, "sst2", "prompt", 0.02, 1),
        make_patch(tiny_base, "subj", "classifier", 0.02, 2),
    )
    assert client.get("/v1/tasks").json() == {"items": [], "count": 0}
    created = put(client, "sst2", patch_to_bytes(prompt))
    assert created.status_code == 201 and created.json()["head"]["mode"] == "prompt"
    head_bytes = patch_to_bytes(head)
    assert put(client, "subj", head_bytes).status_code == 201
    assert put(client, "subj", head_bytes).status_code == 200  # replaced
    listing = client.get("/v1/tasks").json()
    assert listing["count"] == 2 and [t["name"] for t in listing["items"]] == ["sst2", "subj"]
    one = client.get("/v1/tasks/sst2").json()
    assert one["mask_size"] == prompt.mask_size and one["base_fingerprint"] == tiny_base.fingerprint
    assert one["stored"]["source"] == "upload"

    texts = list(TEXTS[:4])
    response = client.post("/v1/classify", json={"task": "sst2", "inputs": texts, "return_probabilities": True})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    want = [softmax(logits) for logits in Reference(tiny_base, prompt).logits(texts).tolist()]
    for prediction, row in zip(result["predictions"], want, strict=True):
        assert list(prediction["probabilities"].values()) == row  # swap path: bit-exact logits
        assert prediction["score"] == max(row)
        assert prediction["label"] == ("negative", "positive")[row.index(max(row))]

    both = client.post(
        "/v1/classify", json={"tasks": ["sst2", "subj"], "inputs": [texts[0], {"text": texts[1], "text_pair": "ok"}]}
    ).json()
    assert [r["task"] for r in both["results"]] == ["sst2", "subj"]
    assert all(p["probabilities"] is None for r in both["results"] for p in r["predictions"])
    pair_ref = Reference(tiny_base, head).probabilities((texts[1], "ok"))
    assert both["results"][1]["predictions"][1]["score"] == pytest.approx(max(pair_ref), abs=1e-5)

    download = client.get("/v1/tasks/subj/patch")
    assert download.status_code == 200 and download.content == head_bytes
    assert download.headers["etag"].strip('"') == client.get("/v1/tasks/subj").json()["etag"]
    assert client.delete("/v1/tasks/subj").status_code == 204
    assert_error(client.get("/v1/tasks/subj"), 404, "task_not_found", "subj")
    assert_error(client.delete("/v1/tasks/subj"), 404, "task_not_found")


def test_errors_share_one_shape(client: TestClient, tiny_base: BaseModel) -> None:
    assert put(client, "t", patch_to_bytes(make_patch(tiny_base, "t"))).status_code == 201
    assert_error(client.post("/v1/classify", json={"task": "nope", "inputs": ["x"]}), 404, "task_not_found", "nope")
    assert_error(client.post("/v1/classify", json={"inputs": ["x"]}), 422, "validation_error", "task")
    assert_error(client.post("/v1/classify", json={"task": "t", "inputs": []}), 422, "validation_error")
    assert_error(
        client.post("/v1/classify", content=b"{not json", headers={"Content-Type": "application/json"}),
        422,
        "validation_error",
    )
    assert_error(client.post("/v1/classify", json={"task": "t", "inputs": [3]}), 422, "validation_error")
    assert_error(
        client.post("/v1/classify", json={"task": "t", "inputs": ["x"] * 9}),
        413,
        "limit_exceeded",
        "max_inputs_per_request=8",
    )
    assert_error(
        client.post("/v1/classify", json={"task": "t", "inputs": ["x" * 201]}),
        413,
        "limit_exceeded",
        "max_text_chars=200",
    )
    assert_error(client.post("/v1/classify", json={"tasks": ["t", "t"], "inputs": ["x"]}), 422, "invalid_input")
    assert_error(client.get("/v1/tasks/Bad%20Name"), 422, "validation_error", "name")
    assert_error(client.get("/v1/nowhere"), 404, "not_found")
    assert_error(put(client, "g", b"garbage bytes"), 400, "invalid_patch", "safetensors")
    foreign = make_patch(tiny_base, "f")
    foreign.base_fingerprint = "sha256:" + "1" * 64
    assert_error(put(client, "f", patch_to_bytes(foreign)), 409, "base_mismatch", "base")
    bad_head = make_patch(tiny_base, "h", "classifier")
    bad_head.head["classifier.weight"] = bad_head.head["classifier.weight"][:, :3]
    assert_error(put(client, "h", patch_to_bytes(bad_head)), 400, "invalid_patch", "classifier.weight")
    assert [t["name"] for t in client.get("/v1/tasks").json()["items"]] == ["t"]


def test_patch_upload_size_limit(tiny_base_dir: Path, tmp_path: Path, tiny_base: BaseModel) -> None:
    with TestClient(create_app(settings_for(tiny_base_dir, tmp_path, max_patch_bytes=2048))) as client:
        data = patch_to_bytes(make_patch(tiny_base, "big", fraction=0.05))
        assert_error(put(client, "big", data), 413, "limit_exceeded", "max_patch_bytes=2048")


def test_a_full_batcher_answers_429(tiny_base_dir: Path, tmp_path: Path, tiny_base: BaseModel) -> None:
    app = create_app(settings_for(tiny_base_dir, tmp_path, max_queue=32, max_batch_size=4, max_batch_wait_ms=0))
    with TestClient(app) as client:
        put(client, "t", patch_to_bytes(make_patch(tiny_base, "t")))
        service = app.state.service
        service.registry.get("t")  # cached now, so the request below goes straight to the (blocked) queue
        with service.engine.weights.lock:  # the inference thread blocks on its first batch: the queue fills up
            filler, _ = service.prepare(["t"], [TextInput("x")] * 30)
            pending = service.engine.submit(filler)
            response = client.post("/v1/classify", json={"task": "t", "inputs": ["a", "b", "c", "d", "e", "f", "g"]})
            assert_error(response, 429, "overloaded", "max_queue=32")
            assert response.headers["retry-after"] == "1"
        assert len(pending.result(timeout=30)) == 30
        assert client.post("/v1/classify", json={"task": "t", "inputs": ["a"]}).status_code == 200


def test_not_ready_without_the_lifespan(tiny_base_dir: Path, tmp_path: Path) -> None:
    client = TestClient(create_app(settings_for(tiny_base_dir, tmp_path)))  # no `with`: the base is not loaded
    assert client.get("/health").status_code == 200
    assert_error(client.get("/ready"), 503, "not_ready")
    assert_error(client.post("/v1/classify", json={"task": "t", "inputs": ["x"]}), 503, "not_ready")


def test_openapi_documents_every_route_with_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {
        "/health",
        "/ready",
        "/v1/info",
        "/v1/tasks",
        "/v1/tasks/{name}",
        "/v1/tasks/{name}/patch",
        "/v1/classify",
    } <= set(paths)
    assert set(paths["/v1/tasks/{name}"]) == {"get", "delete"} and set(paths["/v1/tasks/{name}/patch"]) == {
        "get",
        "put",
    }
    assert "application/octet-stream" in paths["/v1/tasks/{name}/patch"]["put"]["requestBody"]["content"]
    classify = paths["/v1/classify"]["post"]
    assert {"404", "413", "422", "429", "503"} <= set(classify["responses"])
    schemas = spec["components"]["schemas"]
    assert schemas["ClassifyRequest"]["examples"] and schemas["ClassifyResponse"]["examples"]
    assert schemas["ErrorResponse"]["examples"] and schemas["TaskPublic"]["examples"]


def test_concurrent_mixed_requests_match_single_request_references(
    tiny_base_dir: Path, tmp_path: Path, tiny_base: BaseModel
) -> None:
    """1,000 single-input requests over 12 tasks at once: each equals its reference, and the base is intact."""
    patches = [make_patch(tiny_base, f"task{i}", ("prompt", "classifier")[i % 2], 0.02, seed=i + 1) for i in range(12)]
    references = {p.task: Reference(tiny_base, p) for p in patches}
    rng = random.Random(0)
    requests = [(rng.choice(patches).task, rng.choice(TEXTS)) for _ in range(1000)]
    expected = {(task, text): references[task].probabilities(text) for task, text in set(requests)}
    # policy "mixed": with ~80 queued rows per task, `auto` would rightly run every batch as a swap
    app = create_app(
        settings_for(tiny_base_dir, tmp_path, max_batch_size=32, max_batch_wait_ms=5.0, engine_policy="mixed")
    )

    async def drive() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            service = app.state.service
            start = checksum(service.base)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
                for patch in patches:
                    assert (
                        await http.put(f"/v1/tasks/{patch.task}/patch", content=patch_to_bytes(patch))
                    ).status_code == 201
                body = [{"task": t, "inputs": [x], "return_probabilities": True} for t, x in requests]
                responses = await asyncio.gather(*(http.post("/v1/classify", json=b) for b in body))
            stats = service.engine.stats
            assert stats.mixed_batches > 0, stats
            assert checksum(service.base) == start == tiny_base.fingerprint
            return responses

    responses = asyncio.run(drive())
    for (task, text), response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        prediction = response.json()["results"][0]["predictions"][0]
        got = list(prediction["probabilities"].values())
        assert got == pytest.approx(expected[(task, text)], abs=1e-5), (task, text)
