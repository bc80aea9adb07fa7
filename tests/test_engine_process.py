"""The engine's forward passes in a child process (EngineConfig.process): the same answers as in one process."""

from __future__ import annotations

import contextlib
import gc
import pickle
from collections.abc import Iterator
from dataclasses import replace
from multiprocessing.context import SpawnProcess
from pathlib import Path

import pytest
import torch

from app.core.errors import InferenceFailed
from app.engine import remote
from app.engine.remote import RemoteExecutor, task_from_payload, task_payload
from app.engine.service import InferenceService, TextInput
from app.grafting.base import BaseModel
from app.grafting.patch import GraftPatch, patch_to_bytes
from tests.utils.serving import TEXTS, Reference, checksum, make_service
from tests.utils.tiny import make_patch

MODES = ("prompt", "classifier", "prompt")


@pytest.fixture(params=["encoder", "decoder"])
def tiny_source(request: pytest.FixtureRequest) -> tuple[BaseModel, Path]:
    """A tiny base of each family and the folder the child process loads it from."""
    if request.param == "encoder":
        return request.getfixturevalue("tiny_base"), request.getfixturevalue("tiny_base_dir")
    return request.getfixturevalue("tiny_llama"), request.getfixturevalue("tiny_llama_dir")


def process_service(base: BaseModel, folder: Path, store: Path, policy: str, **config: object) -> InferenceService:
    return make_service(base, store, policy=policy, process=True, base_source=str(folder), **config)


@contextlib.contextmanager
def one_task_in_a_child(
    base: BaseModel, folder: Path, store: Path, policy: str, **config: object
) -> Iterator[tuple[InferenceService, torch.Tensor]]:
    """A service whose engine runs in a child process, serving task "t" (one prompt patch); yields it and the
    materialized graft's logits on TEXTS, and closes it after."""
    patch: GraftPatch = make_patch(base, "t", "prompt", 0.02, seed=1)
    reference = Reference(base, patch).logits(TEXTS)
    service = process_service(base, folder, store, policy, **config)
    try:
        service.put_patch("t", patch_to_bytes(patch))
        yield service, reference
    finally:
        service.close()


def logits(service: InferenceService, tasks: list[str]) -> torch.Tensor:
    rows, _ = service.prepare(tasks, [TextInput(t) for t in TEXTS])
    return torch.stack(service.engine.run(rows, timeout=120))


def test_a_child_process_answers_as_the_engine_does_in_one(tiny_source: tuple[BaseModel, Path], tmp_path: Path) -> None:
    base, folder = tiny_source
    patches = [make_patch(base, f"t{i}", mode, 0.02, seed=i + 1) for i, mode in enumerate(MODES)]
    references = {p.task: Reference(base, p).logits(TEXTS) for p in patches}
    before = checksum(base)
    for policy in ("swap", "mixed"):
        service = process_service(base, folder, tmp_path / policy, policy)
        try:
            for patch in patches:
                service.put_patch(patch.task, patch_to_bytes(patch))
            for patch in patches:
                got = logits(service, [patch.task])
                if policy == "swap":  # the child runs the same swap on the same weights: bit for bit
                    assert torch.equal(got, references[patch.task]), patch.task
                else:
                    torch.testing.assert_close(got, references[patch.task], rtol=1e-5, atol=1e-5)
            # all tasks in one batch, rows of each task in request order
            every = logits(service, [p.task for p in patches])
            want = torch.cat([references[p.task] for p in patches])
            torch.testing.assert_close(every, want, rtol=1e-5, atol=1e-5)
            stats = service.engine.stats
            assert stats.rows == len(TEXTS) * len(patches) * 2
            assert (stats.swap_batches if policy == "swap" else stats.mixed_batches) > 0
        finally:
            service.close()
    # this process's copy of the base is never patched
    assert checksum(base) == before


def test_a_replaced_task_is_sent_to_the_child_again(tiny_base: BaseModel, tiny_base_dir: Path, tmp_path: Path) -> None:
    first = make_patch(tiny_base, "t", "prompt", 0.02, seed=1)
    second = make_patch(tiny_base, "t", "prompt", 0.02, seed=2)
    service = process_service(tiny_base, tiny_base_dir, tmp_path, "swap")
    try:
        service.put_patch("t", patch_to_bytes(first))
        assert torch.equal(logits(service, ["t"]), Reference(tiny_base, first).logits(TEXTS))
        service.put_patch("t", patch_to_bytes(second))
        gc.collect()  # the old task object goes: the child is told to drop it
        assert torch.equal(logits(service, ["t"]), Reference(tiny_base, second).logits(TEXTS))
    finally:
        service.close()


def executor_of(service: InferenceService) -> RemoteExecutor:
    executor = service.engine._executor
    assert isinstance(executor, RemoteExecutor)
    return executor


def kill_child(service: InferenceService) -> None:
    child = executor_of(service)._child
    assert child is not None
    child.process.kill()
    child.process.join(10)


def test_a_dead_child_is_replaced_by_the_next_batch(tiny_base: BaseModel, tiny_base_dir: Path, tmp_path: Path) -> None:
    with one_task_in_a_child(tiny_base, tiny_base_dir, tmp_path, "auto") as (service, reference):
        assert torch.equal(logits(service, ["t"]), reference)
        batches = service.engine.stats.batches
        first_child = executor_of(service)._child
        kill_child(service)
        assert service.ready  # a new child is one batch away
        # the batch that finds the child dead waits for a new one, which is sent the task again
        assert torch.equal(logits(service, ["t"]), reference)
        child = executor_of(service)._child
        assert child is not None and child is not first_child and child.running
        assert service.engine.process_restarts == 1
        assert service.info()["engine"]["process_restarts"] == 1
        # counters keep counting across the restart (the new child's own start from zero)
        assert service.engine.stats.batches == batches + 1


def test_a_restart_that_fails_fails_its_batch_and_the_next_batch_tries_again(
    tiny_base: BaseModel, tiny_base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with one_task_in_a_child(tiny_base, tiny_base_dir, tmp_path, "auto") as (service, reference):
        executor = executor_of(service)
        good_config = executor._config
        # the child cannot load its base
        kill_child(service)
        executor._config = replace(good_config, base_source=str(tmp_path / "no-such-base"))
        with pytest.raises(InferenceFailed, match="restarting the engine process failed: .*BaseModelError"):
            logits(service, ["t"])
        failed = executor._child
        assert failed is not None and not failed.running and failed.process.exitcode is not None
        # the process cannot even be started
        executor._config = good_config
        monkeypatch.setattr(SpawnProcess, "start", lambda self: (_ for _ in ()).throw(OSError("no memory")))
        with pytest.raises(InferenceFailed, match="restarting the engine process failed: .*no memory"):
            logits(service, ["t"])
        monkeypatch.undo()
        assert service.ready  # one attempt of three left
        assert torch.equal(logits(service, ["t"]), reference)
        assert service.engine.process_restarts == 1  # started children, not attempts
        assert service.engine.stats.failed_batches == 2


def test_a_child_that_keeps_dying_is_given_up_for_good(
    tiny_base: BaseModel, tiny_base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with one_task_in_a_child(tiny_base, tiny_base_dir, tmp_path, "auto", process_restarts=1) as (service, _):
        logits(service, ["t"])
        kill_child(service)
        logits(service, ["t"])  # the one restart allowed
        kill_child(service)
        assert not service.ready
        rows, _ = service.prepare(["t"], [TextInput("still there?")])
        with pytest.raises(InferenceFailed, match="not restarted again"):
            service.engine.run(rows, timeout=60)
        assert service.engine.stats.failed_batches == 1
        # not back when the window has passed: nothing would restart it, so it stays down for the orchestrator
        monkeypatch.setattr(remote, "RESTART_WINDOW_S", 0.0)
        assert not service.ready
        with pytest.raises(InferenceFailed, match="not restarted again"):
            service.engine.run(rows, timeout=60)
        assert service.engine.process_restarts == 1


def test_a_batch_the_child_cannot_run_fails_alone_and_the_child_serves_on(
    tiny_base: BaseModel, tiny_base_dir: Path, tmp_path: Path
) -> None:
    with one_task_in_a_child(tiny_base, tiny_base_dir, tmp_path, "swap") as (service, reference):
        rows, _ = service.prepare(["t"], [TextInput("fine")])
        task, encoded = rows[0]
        beyond_vocabulary = replace(encoded, input_ids=[10**6] * len(encoded.input_ids))
        with pytest.raises(InferenceFailed, match="in the engine process: IndexError"):
            service.engine.run([(task, beyond_vocabulary)], timeout=60)
        child = executor_of(service)._child
        assert child is not None and child.running
        # the task the failed batch carried is sent again and served by the same child
        assert torch.equal(logits(service, ["t"]), reference)
        assert executor_of(service)._child is child and service.engine.process_restarts == 0


def test_task_tensors_cross_to_the_child_with_their_dtype_and_values(tiny_base: BaseModel, tmp_path: Path) -> None:
    """By value, bfloat16 included (numpy has none), and only a view's own elements."""
    patch = make_patch(tiny_base, "t", "classifier", 0.02, seed=3)
    service = make_service(tiny_base, tmp_path)
    try:
        service.put_patch("t", patch_to_bytes(patch))
        task = service.registry.get("t")
    finally:
        service.close()
    wide = torch.arange(10_000, dtype=torch.float32)
    narrow = replace(
        task,
        values=task.values.to(torch.bfloat16),
        head={name: tensor.to(torch.bfloat16) for name, tensor in task.head.items()},
        slot_counts=wide[:3],
    )
    payload = pickle.loads(pickle.dumps(task_payload(narrow)))
    assert payload["slot_counts"][0].nbytes == 3 * 4
    crossed = task_from_payload(payload, torch.device("cpu"), {})
    for name in ("indices", "values", "slots", "slot_counts", "label_ids"):
        want, got = getattr(narrow, name), getattr(crossed, name)
        assert (want is None) == (got is None), name
        if want is not None:
            assert got.dtype == want.dtype and torch.equal(got, want), name
    assert crossed.head.keys() == narrow.head.keys()
    for name, tensor in narrow.head.items():
        assert crossed.head[name].dtype == torch.bfloat16 and torch.equal(crossed.head[name], tensor)


def test_a_real_server_with_the_setting_on_serves_from_its_child(
    tiny_base: BaseModel, tiny_base_dir: Path, tmp_path: Path
) -> None:
    """Through uvicorn: settings → engine config → a child spawned under the server; /v1/info says so."""
    import httpx

    from tests.utils.processes import Processes

    patch = make_patch(tiny_base, "proc", "prompt", 0.02, seed=5)
    (tmp_path / "logs").mkdir()
    procs = Processes(
        {
            "SKILLGRAFT_BASE_MODEL": str(tiny_base_dir),
            "SKILLGRAFT_STORE_DIR": str(tmp_path / "store"),
            "SKILLGRAFT_ENGINE_PROCESS": "true",
        },
        tmp_path / "logs",
    )
    try:
        url = procs.server(timeout=180)
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/v1/info").json()["engine"]["process"] is True
            assert http.put("/v1/tasks/proc/patch", content=patch_to_bytes(patch)).status_code == 201
            body = {"task": "proc", "inputs": list(TEXTS), "return_probabilities": True}
            response = http.post("/v1/classify", json=body)
            assert response.status_code == 200, response.text
            reference = Reference(tiny_base, patch)
            for text, prediction in zip(TEXTS, response.json()["results"][0]["predictions"], strict=True):
                got = list(prediction["probabilities"].values())
                assert got == pytest.approx(reference.probabilities(text), abs=1e-5)
            # the child's batches reach this server's metrics
            batches = [
                float(line.rsplit(" ", 1)[1])
                for line in http.get("/metrics").text.splitlines()
                if line.startswith("skillgraft_batch_size_count{")
            ]
            assert sum(batches) >= 1
            assert "skillgraft_engine_process_restarts_total 0.0" in http.get("/metrics").text
    finally:
        procs.stop_all()
