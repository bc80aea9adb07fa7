"""Task store and registry: safe names, atomic writes, load once, byte-bounded LRU, other writers, bad patches."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from app.core.errors import InvalidTaskName, TaskNotFound, TaskUnusable
from app.core.store import LocalTaskStore, check_task_name
from app.engine.service import InferenceService, TextInput
from app.grafting.base import BaseModel
from app.grafting.patch import BaseMismatchError, PatchError, patch_to_bytes, save_patch
from tests.utils.serving import TEXTS, Reference, make_service
from tests.utils.tiny import make_patch


@pytest.mark.parametrize("name", ["", "A", "../x", "a/b", ".hidden", "-x", "x" * 65, "a b", "é"])
def test_unsafe_task_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidTaskName):
        check_task_name(name)


@pytest.mark.parametrize("name", ["sst2", "a", "my-task_v1.2", "0" * 64])
def test_safe_task_names_pass(name: str) -> None:
    assert check_task_name(name) == name


def test_a_failed_validation_leaves_the_store_untouched(tmp_path: Path) -> None:
    store = LocalTaskStore(tmp_path)

    def refuse(path: Path) -> None:
        raise PatchError("no")

    with pytest.raises(PatchError):
        store.write_patch("new", b"data", refuse)
    assert store.list_names() == [] and not (tmp_path / "tasks" / "new").exists()
    assert list((tmp_path / ".staging").iterdir()) == []


def classify(service: InferenceService, task: str) -> torch.Tensor:
    rows, _ = service.prepare([task], [TextInput(t) for t in TEXTS])
    return torch.stack(service.engine.run(rows, timeout=60))


def test_many_concurrent_requests_load_a_task_once(tiny_base: BaseModel, tmp_path: Path) -> None:
    service = make_service(tiny_base, tmp_path)
    try:
        service.put_patch("t", patch_to_bytes(make_patch(tiny_base, "t")))
        barrier = threading.Barrier(12)
        seen: list[object] = []

        def ask() -> None:
            barrier.wait()
            seen.append(service.registry.get("t"))

        threads = [threading.Thread(target=ask) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert service.registry.stats["loads"] == 1
        assert len(seen) == 12 and all(task is seen[0] for task in seen)
    finally:
        service.close()


def test_cache_evicts_least_recently_used_under_the_byte_bound_and_reloads(
    tiny_base: BaseModel, tmp_path: Path
) -> None:
    patches = [make_patch(tiny_base, f"t{i}", "prompt", 0.02, seed=i + 1) for i in range(3)]
    probe = make_service(tiny_base, tmp_path / "probe")
    try:
        probe.put_patch("t0", patch_to_bytes(patches[0]))
        size = probe.registry.get("t0").nbytes
    finally:
        probe.close()
    service = make_service(tiny_base, tmp_path / "store", cache_bytes=int(size * 2.5))
    try:
        for patch in patches:
            service.put_patch(patch.task, patch_to_bytes(patch))
        first = classify(service, "t0")
        classify(service, "t1")
        classify(service, "t0")  # t0 is now the most recently used
        classify(service, "t2")  # over budget: evicts t1, the least recently used
        assert service.registry.is_cached("t0") and service.registry.is_cached("t2")
        assert not service.registry.is_cached("t1")
        info = service.registry.cache_info()
        assert info["bytes"] <= info["budget_bytes"] and info["evictions"] == 1 and info["loads"] == 3
        got = classify(service, "t1")  # reloaded on demand, same answers
        assert service.registry.stats["loads"] == 4 and not service.registry.is_cached("t0")
        assert torch.equal(got, Reference(tiny_base, patches[1]).logits(TEXTS))
        assert torch.equal(classify(service, "t0"), first)
    finally:
        service.close()


def test_a_zero_budget_serves_without_caching(tiny_base: BaseModel, tmp_path: Path) -> None:
    service = make_service(tiny_base, tmp_path, cache_bytes=0)
    try:
        service.put_patch("t", patch_to_bytes(make_patch(tiny_base, "t")))
        classify(service, "t")
        classify(service, "t")
        assert service.registry.cache_info()["tasks"] == 0 and service.registry.stats["loads"] == 2
    finally:
        service.close()


def test_patches_written_by_another_writer_are_served_without_restart(tiny_base: BaseModel, tmp_path: Path) -> None:
    service = make_service(tiny_base, tmp_path)
    try:
        with pytest.raises(TaskNotFound):
            service.registry.get("late")
        # Another process writes straight into the store layout (temp file + rename).
        first, second = make_patch(tiny_base, "late", seed=1), make_patch(tiny_base, "late", "classifier", seed=2)
        save_patch(first, tmp_path / "tasks" / "late" / "patch.safetensors")
        assert torch.equal(classify(service, "late"), Reference(tiny_base, first).logits(TEXTS))
        old_etag = service.registry.get("late").etag
        save_patch(second, tmp_path / "tasks" / "late" / "patch.safetensors")
        assert service.registry.get("late").etag != old_etag
        assert torch.equal(classify(service, "late"), Reference(tiny_base, second).logits(TEXTS))
        os.remove(tmp_path / "tasks" / "late" / "patch.safetensors")
        with pytest.raises(TaskNotFound):
            service.registry.get("late")
        assert not service.registry.is_cached("late")
    finally:
        service.close()


def test_a_bad_stored_patch_is_refused_once_and_never_reaches_the_engine(tiny_base: BaseModel, tmp_path: Path) -> None:
    service = make_service(tiny_base, tmp_path)
    try:
        folder = tmp_path / "tasks" / "broken"
        folder.mkdir(parents=True)
        (folder / "patch.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
        for _ in range(3):
            with pytest.raises(TaskUnusable, match="broken"):
                service.registry.get("broken")
        assert service.engine.stats.batches == 0 and service.registry.stats["loads"] == 0
        assert service.describe_task("broken").problem is not None
        # a fixed file (new etag) is picked up
        save_patch(make_patch(tiny_base, "broken"), folder / "patch.safetensors")
        classify(service, "broken")
    finally:
        service.close()


def test_uploads_for_another_base_or_malformed_are_refused(tiny_base: BaseModel, tmp_path: Path) -> None:
    service = make_service(tiny_base, tmp_path)
    try:
        foreign = make_patch(tiny_base, "f")
        foreign.base_fingerprint = "sha256:" + "0" * 64
        with pytest.raises(BaseMismatchError):
            service.put_patch("f", patch_to_bytes(foreign))
        bad_index = make_patch(tiny_base, "b")
        name = next(iter(bad_index.entries))
        indices, values = bad_index.entries[name]
        bad_index.entries[name] = (indices + tiny_base.parameters[name].numel(), values)
        with pytest.raises(PatchError, match="out of range"):
            service.put_patch("b", patch_to_bytes(bad_index))
        assert service.store.list_names() == []
    finally:
        service.close()


def test_delete_forgets_the_task(tiny_base: BaseModel, tmp_path: Path) -> None:
    service = make_service(tiny_base, tmp_path)
    try:
        service.put_patch("d", patch_to_bytes(make_patch(tiny_base, "d")))
        classify(service, "d")
        service.delete_task("d")
        assert not service.registry.is_cached("d") and service.store.list_names() == []
        with pytest.raises(TaskNotFound):
            service.delete_task("d")
    finally:
        service.close()
