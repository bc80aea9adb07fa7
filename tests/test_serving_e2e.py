"""End to end against a real ``skillgraft serve`` (uvicorn) process on a free port, driven by httpx."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.cli import main
from app.core.store import LocalTaskStore
from app.grafting.base import BaseModel
from app.grafting.patch import patch_to_bytes
from tests.utils.processes import Processes
from tests.utils.serving import TEXTS, Reference
from tests.utils.tiny import make_patch


@pytest.fixture(scope="module")
def server(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    store = tmp_path_factory.mktemp("e2e-store")
    procs = Processes(
        {
            "SKILLGRAFT_BASE_MODEL": str(tiny_base_dir),
            "SKILLGRAFT_STORE_DIR": str(store),
            "SKILLGRAFT_MAX_BATCH_WAIT_MS": "3",
        },
        tmp_path_factory.mktemp("e2e-logs"),
    )
    try:
        yield procs.server(), store
    finally:
        procs.stop_all()


def probabilities(response: httpx.Response) -> list[list[list[float]]]:
    assert response.status_code == 200, response.text
    return [[list(p["probabilities"].values()) for p in r["predictions"]] for r in response.json()["results"]]


def test_upload_classify_and_other_writers(server: tuple[str, Path], tiny_base: BaseModel) -> None:
    url, store_dir = server
    patches = [make_patch(tiny_base, f"e2e{i}", ("prompt", "classifier")[i % 2], 0.02, seed=i + 3) for i in range(3)]
    with httpx.Client(base_url=url, timeout=60) as http:
        info = http.get("/v1/info").json()
        assert info["base"]["fingerprint"] == tiny_base.fingerprint
        for patch in patches[:2]:
            response = http.put(f"/v1/tasks/{patch.task}/patch", content=patch_to_bytes(patch))
            assert response.status_code == 201, response.text
        # A third task written by this (other) process straight into the store: served without a restart.
        LocalTaskStore(store_dir).write_patch("e2e2", patch_to_bytes(patches[2]), lambda path: None, source="test")
        names = [p.task for p in patches]
        body = {"tasks": names, "inputs": list(TEXTS[:3]), "return_probabilities": True}
        got = probabilities(http.post("/v1/classify", json=body))
        for patch, rows in zip(patches, got, strict=True):
            reference = Reference(tiny_base, patch)
            for text, row in zip(TEXTS[:3], rows, strict=True):
                assert row == pytest.approx(reference.probabilities(text), abs=1e-5)
        # Replaced by the other writer: the next request sees the new patch.
        replacement = make_patch(tiny_base, "e2e2", "prompt", 0.02, seed=99)
        LocalTaskStore(store_dir).write_patch("e2e2", patch_to_bytes(replacement), lambda path: None)
        row = probabilities(http.post("/v1/classify", json={**body, "tasks": ["e2e2"], "inputs": [TEXTS[0]]}))[0][0]
        assert row == pytest.approx(Reference(tiny_base, replacement).probabilities(TEXTS[0]), abs=1e-5)
        assert http.get("/v1/tasks").json()["count"] == 3
        error = http.post("/v1/classify", json={"task": "missing", "inputs": ["x"]})
        assert error.status_code == 404 and error.json()["error"]["code"] == "task_not_found"


def test_32_concurrent_clients(server: tuple[str, Path], tiny_base: BaseModel) -> None:
    url, _ = server
    patch = make_patch(tiny_base, "conc", "prompt", 0.02, seed=7)
    expected = {text: Reference(tiny_base, patch).probabilities(text) for text in TEXTS}

    async def drive() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            assert (await http.put("/v1/tasks/conc/patch", content=patch_to_bytes(patch))).status_code == 201

            async def client(i: int) -> list[httpx.Response]:
                out = []
                for j in range(4):
                    text = TEXTS[(i + j) % len(TEXTS)]
                    body = {"task": "conc", "inputs": [text], "return_probabilities": True}
                    out.append(await http.post("/v1/classify", json=body))
                return out

            return [r for batch in await asyncio.gather(*(client(i) for i in range(32))) for r in batch]

    responses = asyncio.run(drive())
    assert len(responses) == 128
    for response in responses:
        row = probabilities(response)[0][0]
        assert any(row == pytest.approx(want, abs=1e-5) for want in expected.values())


def test_bad_settings_fail_at_start_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("SKILLGRAFT_MAX_BATCH_SIZE", "0")
    assert main(["serve", "--store-dir", str(tmp_path)]) == 2
    assert "SKILLGRAFT_MAX_BATCH_SIZE" in capsys.readouterr().err
    monkeypatch.delenv("SKILLGRAFT_MAX_BATCH_SIZE")
    assert main(["serve", "--base-model", str(tmp_path / "nowhere")]) == 2
    assert "is not a packaged base" in capsys.readouterr().err
