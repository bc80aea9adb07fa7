"""The Open Inference Protocol (KServe v2) front through the real ``tritonclient.http`` against a real uvicorn
process: health, metadata, inference equal to ``/v1/classify``, and errors in the protocol's shape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from app.grafting.base import BaseModel
from app.grafting.patch import save_patch
from tests.utils.processes import Processes
from tests.utils.serving import TEXTS
from tests.utils.tiny import make_patch

PAIRS = [("A man plays a guitar.", "Someone makes music."), ("A dog sleeps.", "A cat runs across the road.")]
TOPICS = ("sport", "politics", "science")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_base_dir: Path, tiny_base: BaseModel) -> Iterator[str]:
    root = tmp_path_factory.mktemp("kserve")
    tasks = root / "store" / "tasks"
    save_patch(make_patch(tiny_base, "films", "prompt", seed=3), tasks / "films" / "patch.safetensors")
    save_patch(make_patch(tiny_base, "topics", "classifier", labels=TOPICS), tasks / "topics" / "patch.safetensors")
    (tasks / "broken").mkdir(parents=True)
    (tasks / "broken" / "patch.safetensors").write_bytes(b"not a safetensors file")
    procs = Processes(
        {
            "SKILLGRAFT_STORE_DIR": str(root / "store"),
            "SKILLGRAFT_BASE_MODEL": str(tiny_base_dir),
            "SKILLGRAFT_MAX_BATCH_WAIT_MS": "1",
        },
        root,
    )
    try:
        yield procs.server()
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.removeprefix("http://"), network_timeout=30)
    yield client
    client.close()


def text_input(name: str, texts: list[str], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=np.object_), binary_data=binary)
    return tensor


def v1(server: str, task: str, inputs: list) -> list[dict]:
    body = {"task": task, "inputs": inputs, "return_probabilities": True}
    response = httpx.post(server + "/v1/classify", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["predictions"]


def test_health_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "skillgraft"
    assert "binary_tensor_data" in metadata["extensions"]
    assert client.is_model_ready("films")
    assert client.is_model_ready("topics", "1")  # a version segment is accepted
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready("broken")  # stored, but the patch cannot be read


def test_model_metadata(client: triton.InferenceServerClient, server: str) -> None:
    metadata = client.get_model_metadata("topics")
    assert metadata["name"] == "topics"
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("TEXT", "BYTES", [-1]),
        ("TEXT_PAIR", "BYTES", [-1]),
    ]
    outputs = {t["name"]: t for t in metadata["outputs"]}
    assert [(t["datatype"], t["shape"]) for t in outputs.values()] == [
        ("BYTES", [-1]),
        ("FP32", [-1]),
        ("FP32", [-1, 3]),
    ]
    assert outputs["PROBABILITIES"]["parameters"]["labels"] == list(TOPICS)
    assert client.get_model_metadata("topics", "7") == metadata
    assert httpx.get(server + "/v2/").json()["name"] == "skillgraft"
    for name, status in (("nope", "404"), ("broken", "409")):
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_metadata(name)
        assert caught.value.status() == status
        assert caught.value.message()


@pytest.mark.parametrize("task", ["films", "topics"])
def test_infer_matches_v1(client: triton.InferenceServerClient, server: str, task: str) -> None:
    texts = list(TEXTS)
    expected = v1(server, task, texts)
    labels = [p["label"] for p in expected]
    probabilities = np.array([list(p["probabilities"].values()) for p in expected], dtype=np.float32)
    scores = np.array([p["score"] for p in expected], dtype=np.float32)

    # Binary input, outputs named (JSON for two, binary for one) and returned in the order asked.
    outputs = [
        triton.InferRequestedOutput("PROBABILITIES", binary_data=False),
        triton.InferRequestedOutput("LABEL", binary_data=True),
        triton.InferRequestedOutput("SCORE", binary_data=False),
    ]
    result = client.infer(task, [text_input("TEXT", texts)], outputs=outputs, request_id="req-7")
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == task
    assert [o["name"] for o in response["outputs"]] == ["PROBABILITIES", "LABEL", "SCORE"]
    assert [label.decode() for label in result.as_numpy("LABEL")] == labels
    assert np.array_equal(result.as_numpy("PROBABILITIES"), probabilities)
    assert np.array_equal(result.as_numpy("SCORE"), scores)

    # The client's defaults: binary input, no outputs named, so every output comes back as binary data.
    result = client.infer(task, [text_input("TEXT", texts)], model_version="1")
    assert [label.decode() for label in result.as_numpy("LABEL")] == labels
    assert result.as_numpy("PROBABILITIES").shape == probabilities.shape
    assert np.array_equal(result.as_numpy("PROBABILITIES"), probabilities)

    # Plain JSON both ways carries the engine's numbers exactly.
    body = {"id": "x", "inputs": [{"name": "TEXT", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
    response = httpx.post(f"{server}/v2/models/{task}/infer", json=body, timeout=30).json()
    data = {o["name"]: o["data"] for o in response["outputs"]}
    assert data["LABEL"] == labels
    assert data["SCORE"] == [p["score"] for p in expected]
    assert data["PROBABILITIES"] == [v for p in expected for v in p["probabilities"].values()]


def test_infer_text_pairs(client: triton.InferenceServerClient, server: str) -> None:
    expected = v1(server, "topics", [{"text": a, "text_pair": b} for a, b in PAIRS])
    inputs = [text_input("TEXT", [a for a, _ in PAIRS]), text_input("TEXT_PAIR", [b for _, b in PAIRS], binary=False)]
    result = client.infer("topics", inputs, outputs=[triton.InferRequestedOutput("PROBABILITIES")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["PROBABILITIES"]
    want = np.array([list(p["probabilities"].values()) for p in expected], dtype=np.float32)
    assert np.array_equal(result.as_numpy("PROBABILITIES"), want)


def test_errors_in_protocol_shape(client: triton.InferenceServerClient, server: str) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("nope", [text_input("TEXT", ["hello"])])
    assert caught.value.status() == "404" and "nope" in caught.value.message()

    infer = f"{server}/v2/models/films/infer"
    bad_bodies = [
        [{"name": "TEXT", "shape": [3], "datatype": "BYTES", "data": ["only", "two"]}],  # shape disagrees
        [{"name": "TEXT", "shape": [1], "datatype": "FP32", "data": [1.0]}],  # wrong datatype
        [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": [7]}],  # not strings
        [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": ["x"]}],  # unknown input
        [{"name": "TEXT", "shape": [1], "datatype": "BYTES"}],  # no data
    ]
    for inputs in bad_bodies:
        response = httpx.post(infer, json={"inputs": inputs}, timeout=30)
        assert response.status_code == 400, (inputs, response.text)
        assert isinstance(response.json()["error"], str)
    for content in (b"{not json", b'{"inputs": "TEXT"}'):
        response = httpx.post(infer, content=content, timeout=30)
        assert response.status_code == 400 and isinstance(response.json()["error"], str)
    good = [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["x"]}]
    response = httpx.post(infer, json={"inputs": good, "outputs": [{"name": "EMBEDDING"}]}, timeout=30)
    assert response.status_code == 400 and "EMBEDDING" in response.json()["error"]

    # A name no task can have is an unknown model; an unknown /v2 path answers in the same shape.
    assert httpx.get(server + "/v2/models/Not%20A%20Name").status_code == 404
    response = httpx.get(server + "/v2/models/films/explain")
    assert response.status_code == 404 and isinstance(response.json()["error"], str)
    response = httpx.get(infer)
    assert response.status_code == 405 and response.headers["allow"] == "POST"

    # v1 keeps its own error shape.
    response = httpx.post(server + "/v1/classify", json={"task": "nope", "inputs": ["x"]}, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == "task_not_found"
