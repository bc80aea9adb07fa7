"""Engine maths: swap is bit-exact, mixed is exact up to rounding, the base is always restored."""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from app.core.errors import InferenceFailed
from app.engine import kernel
from app.engine import service as service_module
from app.engine.service import InferenceService, TextInput, softmax
from app.engine.weights import BaseWeights
from app.grafting.base import BaseModel
from app.grafting.heads import HeadSpec
from app.grafting.patch import GraftPatch, build_patch, patch_to_bytes
from tests.utils.serving import TEXTS, Reference, checksum, make_service
from tests.utils.tiny import make_patch, random_finetune
from tests.utils.tokens import assert_classifier_encoding_matches_the_wrapper, assert_text_ids_match_the_wrapper

MODES = ("prompt", "classifier", "prompt", "classifier")


def upload(service: InferenceService, patch: GraftPatch) -> None:
    service.put_patch(patch.task, patch_to_bytes(patch))


def engine_logits(service: InferenceService, task: str, texts: tuple[str, ...]) -> torch.Tensor:
    rows, _ = service.prepare([task], [TextInput(t) for t in texts])
    return torch.stack(service.engine.run(rows, timeout=60))


@pytest.fixture
def patches(tiny_base: BaseModel) -> list[GraftPatch]:
    return [make_patch(tiny_base, f"t{i}", mode, 0.02, seed=i + 1) for i, mode in enumerate(MODES)]


@pytest.fixture
def family_patches(tiny_any: BaseModel) -> list[GraftPatch]:
    return [make_patch(tiny_any, f"t{i}", mode, 0.02, seed=i + 1) for i, mode in enumerate(MODES)]


def test_swap_is_bit_exact_against_the_materialized_graft(
    tiny_any: BaseModel, family_patches: list[GraftPatch], tmp_path: Path
) -> None:
    before = checksum(tiny_any)
    service = make_service(tiny_any, tmp_path, policy="swap")
    try:
        for patch in family_patches:
            upload(service, patch)
            got = engine_logits(service, patch.task, TEXTS)
            want = Reference(tiny_any, patch).logits(TEXTS)
            assert torch.equal(got, want), patch.task
        assert service.engine.stats.swap_batches == len(family_patches)
    finally:
        service.close()
    assert checksum(tiny_any) == before


@dataclass
class KernelUse:
    enabled: bool
    calls: list[str] = field(default_factory=list)


@pytest.fixture(params=["torch operators", "fused kernel"])
def kernel_use(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> KernelUse:
    """The mixed path's Linear deltas by torch operators (an engine with the kernel off), or by the compiled
    kernels (app.engine.kernel), whose calls are recorded."""
    use = KernelUse(enabled=request.param == "fused kernel")
    if not use.enabled:
        return use
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the kernels cannot be built here (the torch operators serve)")
    built = kernel.build()
    assert built is not None, kernel.failure()

    class Recorded:
        def linear_delta(self, *args: Any) -> None:
            use.calls.append("linear")
            built.linear_delta(*args)

        def bias_delta(self, *args: Any) -> None:
            use.calls.append("bias")
            built.bias_delta(*args)

    recorded = Recorded()
    monkeypatch.setattr(kernel, "compiled", lambda: recorded)
    return use


def test_mixed_matches_the_materialized_graft(
    tiny_any: BaseModel, family_patches: list[GraftPatch], tmp_path: Path, kernel_use: KernelUse
) -> None:
    before = checksum(tiny_any)
    service = make_service(tiny_any, tmp_path, policy="mixed", mixed_kernel=kernel_use.enabled)
    try:
        for patch in family_patches:
            upload(service, patch)
        references = {p.task: Reference(tiny_any, p).logits(TEXTS) for p in family_patches}
        # One request, every task: a single forward pass holding rows of four tasks in both head modes.
        tasks = [p.task for p in family_patches]
        rows, _ = service.prepare(tasks, [TextInput(t) for t in TEXTS])
        logits = service.engine.run(rows, timeout=60)
        assert service.engine.stats.mixed_batches == 1 and service.engine.stats.swap_batches == 0
        for i, task in enumerate(tasks):
            got = torch.stack(logits[i * len(TEXTS) : (i + 1) * len(TEXTS)])
            torch.testing.assert_close(got, references[task], rtol=0, atol=1e-5)
            # the graft changes the output: the deltas really were added
            assert not torch.allclose(got, Reference(tiny_any, _empty(family_patches[i])).logits(TEXTS), atol=1e-4)
    finally:
        service.close()
    assert checksum(tiny_any) == before
    # the kernels, where asked for, added the Linear weight entries, and the bias entries where Linears have biases
    biases = any(isinstance(m, torch.nn.Linear) and m.bias is not None for m in tiny_any.encoder.modules())
    expected = {"linear", "bias"} if biases else {"linear"}
    assert set(kernel_use.calls) == (expected if kernel_use.enabled else set())


def _empty(patch: GraftPatch) -> GraftPatch:
    return GraftPatch(patch.task, patch.spec, patch.base_fingerprint, {}, dict(patch.head))


def test_a_task_touching_embeddings_runs_by_swap_inside_a_mixed_batch(tiny_base: BaseModel, tmp_path: Path) -> None:
    ft = random_finetune(tiny_base, seed=5)
    name = "embeddings.word_embeddings.weight"
    ft[name] = tiny_base.parameters[name].detach() + 0.05
    mask = {name: torch.rand(tiny_base.parameters[name].shape, generator=torch.Generator().manual_seed(0)) < 0.01}
    mask["encoder.layer.0.output.dense.weight"] = torch.ones_like(
        tiny_base.parameters["encoder.layer.0.output.dense.weight"], dtype=torch.bool
    )
    spec = HeadSpec("prompt", ("negative", "positive"), "{text} It was {mask} .", ("terrible", "great"))
    odd = build_patch(tiny_base.parameters, ft, mask, task="odd", spec=spec, base_fingerprint=tiny_base.fingerprint)
    plain = make_patch(tiny_base, "plain", "prompt", 0.02)
    service = make_service(tiny_base, tmp_path, policy="mixed")
    try:
        upload(service, odd)
        upload(service, plain)
        assert not service.registry.get("odd").mixable and service.registry.get("plain").mixable
        rows, _ = service.prepare(["odd", "plain"], [TextInput(t) for t in TEXTS])
        logits = service.engine.run(rows, timeout=60)
        assert torch.equal(torch.stack(logits[: len(TEXTS)]), Reference(tiny_base, odd).logits(TEXTS))
        torch.testing.assert_close(
            torch.stack(logits[len(TEXTS) :]), Reference(tiny_base, plain).logits(TEXTS), rtol=0, atol=1e-5
        )
        assert service.engine.stats.swap_batches == 1 and service.engine.stats.mixed_batches == 1
    finally:
        service.close()


@pytest.mark.parametrize("policy", ["swap", "mixed"])
def test_an_exception_in_the_forward_pass_restores_the_base(
    tiny_base: BaseModel, patches: list[GraftPatch], tmp_path: Path, policy: str
) -> None:
    before = checksum(tiny_base)
    service = make_service(tiny_base, tmp_path, policy=policy)
    armed = {"on": True}

    def explode(module: torch.nn.Module, inputs: object, output: object) -> None:
        if armed["on"]:
            raise RuntimeError("injected failure inside the forward pass")

    handle = tiny_base.encoder.encoder.layer[-1].register_forward_hook(explode)
    try:
        for patch in patches[:2]:
            upload(service, patch)
        with pytest.raises(InferenceFailed):
            engine_logits(service, "t0", TEXTS)
        with pytest.raises(InferenceFailed):
            rows, _ = service.prepare(["t0", "t1"], [TextInput(t) for t in TEXTS])
            service.engine.run(rows, timeout=60)
        with service.engine.weights.lock:  # no batch of the failed requests is in flight while we read
            assert checksum(tiny_base) == before
        assert service.engine.stats.failed_batches >= 2
        armed["on"] = False  # the engine keeps serving after a failed batch
        got = engine_logits(service, "t0", TEXTS)
        torch.testing.assert_close(got, Reference(tiny_base, patches[0]).logits(TEXTS), rtol=0, atol=1e-5)
    finally:
        handle.remove()
        service.close()
    assert checksum(tiny_base) == before


def test_auto_policy_swaps_single_task_batches_and_mixes_many(
    tiny_base: BaseModel, patches: list[GraftPatch], tmp_path: Path
) -> None:
    service = make_service(tiny_base, tmp_path, policy="auto")
    try:
        for patch in patches:
            upload(service, patch)
        got = engine_logits(service, "t1", TEXTS)
        assert torch.equal(got, Reference(tiny_base, patches[1]).logits(TEXTS))
        assert service.engine.stats.swap_batches == 1
        rows, _ = service.prepare([p.task for p in patches], [TextInput(TEXTS[0])])
        service.engine.run(rows, timeout=60)
        assert service.engine.stats.mixed_batches == 1
    finally:
        service.close()


@pytest.mark.parametrize(("swap_min_rows", "swaps", "mixes"), [(4, 4, 0), (5, 0, 1)])
def test_auto_swaps_a_task_with_enough_queued_rows_and_mixes_scattered_ones(
    tiny_base: BaseModel, patches: list[GraftPatch], tmp_path: Path, swap_min_rows: int, swaps: int, mixes: int
) -> None:
    """Four tasks with four rows each, interleaved in one submission: no task fills 75% of the batch, so only
    ``swap_min_rows`` decides between four swap batches and one mixed batch; the answers are the same."""
    service = make_service(tiny_base, tmp_path, policy="auto", swap_min_rows=swap_min_rows)
    try:
        for patch in patches:
            upload(service, patch)
        rows, _ = service.prepare([p.task for p in patches], [TextInput(t) for t in TEXTS[:4]])
        interleaved = [rows[task * 4 + i] for i in range(4) for task in range(len(patches))]
        logits = service.engine.run(interleaved, timeout=60)
        assert (service.engine.stats.swap_batches, service.engine.stats.mixed_batches) == (swaps, mixes)
        for j, (task, _) in enumerate(interleaved):
            reference = Reference(tiny_base, patches[[p.task for p in patches].index(task.name)])
            expected = reference.logits([TEXTS[j // len(patches)]])[0]
            torch.testing.assert_close(logits[j], expected, rtol=1e-5, atol=1e-5)
    finally:
        service.close()


def test_text_pairs_reach_the_head(tiny_base: BaseModel, tmp_path: Path) -> None:
    patch = make_patch(tiny_base, "pairs", "classifier", 0.02)
    service = make_service(tiny_base, tmp_path, policy="swap")
    try:
        upload(service, patch)
        pairs = [("a man plays a guitar", "someone makes music"), ("a cat sleeps", "the stock market fell")]
        rows, _ = service.prepare(["pairs"], [TextInput(a, b) for a, b in pairs])
        got = torch.stack(service.engine.run(rows, timeout=60))
        assert torch.equal(got, Reference(tiny_base, patch).logits(pairs))
    finally:
        service.close()


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.float64)])
def test_base_weights_swap_and_restore_exactly_with_or_without_a_flat_buffer(dtypes: tuple[torch.dtype, ...]) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2).to(dtypes[1]))
    module[0].to(dtypes[0])
    module.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    weights = BaseWeights(module)
    assert (weights.flat is not None) == (dtypes[0] == dtypes[1])
    assert all(torch.equal(p, before[name]) for name, p in module.named_parameters())
    # global indices in slot order, not parameter order: the fallback must not assume any order
    indices = torch.tensor([weights.offsets["1.weight"] + 5, weights.offsets["0.bias"] + 1, 2], dtype=torch.int32)
    values = torch.tensor([7.0, 8.0, 9.0], dtype=torch.float64)
    with weights.lock:
        saved = weights.apply(indices, values)
        assert float(module[1].weight.view(-1)[5]) == 7.0 and float(module[0].bias[1]) == 8.0
        assert float(module[0].weight.view(-1)[2]) == 9.0
        weights.restore(saved)
    assert all(torch.equal(p, before[name]) for name, p in module.named_parameters())


def test_a_write_failing_part_way_leaves_the_base_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-tensor path (mixed dtypes) writes tensor by tensor: if the second write fails, the first is undone."""
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2).to(torch.float64))
    module.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    weights = BaseWeights(module)
    assert weights.flat is None
    real_segments = weights._segments
    calls: list[int] = []

    def failing_segments(indices: torch.Tensor) -> list:
        calls.append(len(calls))
        segments = real_segments(indices)
        if len(calls) == 2:  # apply reads the originals (call 1), then writes (call 2); restore is call 3
            flat, local, where = segments[1]
            segments[1] = (flat, local + 10_000, where)  # out of range: raises after segment 0 was written
        return segments

    indices = torch.tensor([1, weights.offsets["1.weight"] + 2], dtype=torch.int64)
    values = torch.tensor([5.0, 6.0], dtype=torch.float64)
    monkeypatch.setattr(weights, "_segments", failing_segments)
    with weights.lock, pytest.raises(IndexError):
        weights.apply(indices, values)
    assert len(calls) == 3, "the failure came from the write, and the restore ran"
    assert all(torch.equal(p, before[name]) for name, p in module.named_parameters())


def test_a_repeated_mixed_batch_reuses_its_plan_and_a_new_composition_does_not(
    tiny_any: BaseModel, family_patches: list[GraftPatch], tmp_path: Path
) -> None:
    service = make_service(tiny_any, tmp_path, policy="mixed")
    try:
        for patch in family_patches:
            upload(service, patch)
        tasks = [p.task for p in family_patches]
        rows, _ = service.prepare(tasks, [TextInput(t) for t in TEXTS])
        first = service.engine.run(rows, timeout=60)
        plan = service.engine._last_plan
        again = service.engine.run(rows, timeout=60)
        assert service.engine._last_plan is plan
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)
        service.engine.run(rows[: len(TEXTS)], timeout=60)
        assert service.engine._last_plan is not plan
        # Same tasks, shorter inputs: a plan's flat indices are laid out for its batch's length, so no reuse.
        short, _ = service.prepare(tasks, [TextInput("no") for _ in TEXTS])
        service.engine.run(rows, timeout=60)
        plan = service.engine._last_plan
        assert plan is not None
        service.engine.run(short, timeout=60)
        assert service.engine._last_plan is not plan
        assert service.engine._last_plan[1].length < plan[1].length
    finally:
        service.close()


@given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=40))
def test_response_softmax_agrees_with_torch_in_double(logits: list[float]) -> None:
    """The service turns logits into probabilities in plain Python (cheap on the event loop); it must say what
    torch's double-precision softmax says, even for logits far apart, where a naive exp would overflow."""
    ours = softmax(logits)
    theirs = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=-1).tolist()
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-300)
    assert sum(ours) == pytest.approx(1.0, abs=1e-12)


def test_small_cached_requests_skip_the_thread_hop_and_agree_with_it(
    tiny_base: BaseModel, patches: list[GraftPatch], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request for cached tasks with little text is tokenised on the event loop; any other goes through a
    worker thread. Both give the same predictions, and each counts one cache hit per task, not two."""
    hops: list[object] = []
    thread_run = anyio.to_thread.run_sync

    async def counted(function: object, *args: object) -> object:
        hops.append(function)
        return await thread_run(function, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    service = make_service(tiny_base, tmp_path)
    try:
        for patch in patches[:2]:
            upload(service, patch)
        tasks, inputs = [patches[0].task, patches[1].task], [TextInput(t) for t in TEXTS[:2]]
        asyncio.run(service.classify(tasks, inputs))  # loads both tasks into the cache if the upload did not

        hops.clear()
        hits = service.registry.cache_info()["hits"]
        on_loop = asyncio.run(service.classify(tasks, inputs, return_probabilities=True))
        assert hops == [] and service.registry.cache_info()["hits"] == hits + 2

        monkeypatch.setattr(service_module, "INLINE_PREPARE_MAX_CHARS", 10)  # now the same request is too big
        in_thread = asyncio.run(service.classify(tasks, inputs, return_probabilities=True))
        assert hops == [service.prepare] and service.registry.cache_info()["hits"] == hits + 4
        assert in_thread == on_loop

        monkeypatch.setattr(service_module, "INLINE_PREPARE_MAX_CHARS", 2048)
        many_rows = [TextInput("ok")] * (service_module.INLINE_PREPARE_MAX_ROWS // len(tasks) + 1)  # tiny text
        asyncio.run(service.classify(tasks, many_rows))
        assert hops == [service.prepare, service.prepare]
    finally:
        service.close()


def test_fast_token_ids_match_the_wrapper_on_both_tiny_families(tiny_any: BaseModel) -> None:
    assert_text_ids_match_the_wrapper(tiny_any.tokenizer, TEXTS)
    assert_classifier_encoding_matches_the_wrapper(
        tiny_any.tokenizer, [(t, None) for t in TEXTS] + [(t, t[::-1]) for t in TEXTS]
    )
