"""Skill localization: the closed-form S-gradient, mask sizes, the size cap, best-step selection, recovery of a
known skill set on a synthetic task, exact restore of the base, and the CLI end to end on real data."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from app.cli import main
from app.grafting.base import BaseModel, EligibleRule
from app.grafting.heads import Example, TaskModel, Tokenization
from app.grafting.inference import predict_logits
from app.grafting.localize import (
    LocalizationCancelled,
    LocalizeConfig,
    MaskLearner,
    _BestMask,
    localize,
    mask_size,
    random_k_mask,
    soft_mask,
    top_k_mask,
)
from app.grafting.patch import build_patch, grafted, load_patch, validate_patch
from tests.utils.planted import SPEC, entries, planted_task, sentences
from tests.utils.tiny import load_tiny, random_finetune


def snapshot(base: BaseModel) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in base.parameters.items()}


def assert_identical(base: BaseModel, saved: dict[str, torch.Tensor]) -> None:
    for name, tensor in base.parameters.items():
        assert torch.equal(tensor, saved[name]), name
        assert not tensor.requires_grad, name
        assert tensor.grad is None, name


@pytest.fixture
def fresh_tiny(tiny_base_dir: Path) -> BaseModel:
    """A private copy of the tiny base, free to be modified (double precision, planted weights)."""
    return load_tiny(tiny_base_dir)


def test_s_gradient_matches_autograd_in_float64(fresh_tiny: BaseModel) -> None:
    base = fresh_tiny
    base.encoder.double()
    ft = random_finetune(base, seed=3, scale=0.2)
    examples = [Example(text, i % 2) for i, text in enumerate(sentences(7))]
    # b = 2 keeps σ'(S − b) far from zero so the comparison tests the chain rule, not underflow; l1 is included
    config = LocalizeConfig(sparsity=0.05, bias=2.0, l1=0.3, micro_batch=3, seed=5)
    saved = snapshot(base)
    with MaskLearner(base, ft, SPEC, config) as learner:
        encoded = learner.tokenization.encode_many(examples)
        labels = [e.label for e in examples]
        loss, closed = learner.s_gradient(encoded, labels)
        closed = {n: g.clone() for n, g in closed.items()}

        leaves = {n: learner.scores[n].clone().requires_grad_(True) for n in learner.names}
        theta, total_size = {}, torch.zeros((), dtype=torch.float64)
        for n in learner.names:
            gamma = soft_mask(leaves[n], learner.base_mask[n], config.bias)
            theta["encoder." + n] = learner.pre[n] + gamma * (learner.ft[n] - learner.pre[n])
            total_size = total_size + gamma.sum()
        batch = learner.tokenization.collate(encoded)
        logits = torch.func.functional_call(learner.model, theta, (batch,))
        reference = torch.nn.functional.cross_entropy(logits, torch.tensor(labels))
        grads = torch.autograd.grad(reference + config.l1 * total_size, [leaves[n] for n in learner.names])
    assert loss == pytest.approx(float(reference.detach()), rel=1e-10)
    for n, g in zip(learner.names, grads, strict=True):
        torch.testing.assert_close(closed[n], g, rtol=1e-7, atol=1e-15)
    assert any(float(g.abs().max()) > 0 for g in grads)
    assert_identical(base, saved)


def test_gamma_base_has_exactly_k_entries_even_among_ties(tiny_base: BaseModel) -> None:
    flat = {"a": torch.ones(10, 3), "b": torch.ones(7)}  # every score tied
    for k in (0, 1, 13, 37):
        assert mask_size(top_k_mask(flat, k)) == k
    ft = random_finetune(tiny_base, seed=1)
    config = LocalizeConfig(sparsity=3e-3)
    with MaskLearner(tiny_base, ft, SPEC, config) as learner:
        assert learner.k == int(3e-3 * learner.eligible_size) > 0
        assert mask_size(learner.base_mask) == learner.k
        # the top-k really holds the largest movements
        smallest_in = min(
            float((ft[n] - learner.pre[n]).abs()[m].min()) for n, m in learner.base_mask.items() if m.any()
        )
        largest_out = max(float((ft[n] - learner.pre[n]).abs()[~m].max()) for n, m in learner.base_mask.items())
        assert smallest_in >= largest_out
    shapes = {"a": torch.Size([10, 3]), "b": torch.Size([7])}
    assert mask_size(random_k_mask(shapes, 11, seed=4)) == 11
    again = random_k_mask(shapes, 11, seed=4)
    assert all(torch.equal(mask, again[name]) for name, mask in random_k_mask(shapes, 11, seed=4).items())


def test_data_free_methods_have_the_requested_size(tiny_base: BaseModel) -> None:
    ft = random_finetune(tiny_base, seed=2)
    saved = snapshot(tiny_base)
    sizes = {}
    for method in ("topk", "random", "topk-rms"):
        result = localize(tiny_base, ft, SPEC, config=LocalizeConfig(method=method, sparsity=0.01))
        sizes[method] = result.size
        assert mask_size(result.mask) == result.size == result.k == int(0.01 * result.eligible_size)
        assert set(result.mask) == set(EligibleRule().select(tiny_base.parameters))
    capped = localize(tiny_base, ft, SPEC, config=LocalizeConfig(method="topk", sparsity=0.01, budget=5))
    assert capped.size == 5
    assert_identical(tiny_base, saved)


def test_learned_mask_recovers_the_planted_skill(fresh_tiny: BaseModel) -> None:
    base = fresh_tiny
    ft, planted, examples = planted_task(base)
    train, dev = examples[:16], examples[16:]
    eligible = sum(base.parameters[n].numel() for n in EligibleRule().select(base.parameters))
    sparsity = (16 * base.hidden_size + 0.5) / eligible  # γ_base = exactly the decoy rows
    saved = snapshot(base)
    events: list[dict] = []
    learned = localize(
        base,
        ft,
        SPEC,
        train,
        dev,
        LocalizeConfig(sparsity=sparsity, steps=10, bias=5.0, max_step=3.0),
        progress=events.append,
    )
    topk = localize(base, ft, SPEC, config=LocalizeConfig(method="topk", sparsity=sparsity))
    assert_identical(base, saved)
    assert not entries(topk.mask) & planted  # the decoy wins on magnitude
    found = entries(learned.mask) - entries(topk.mask)
    assert found and found <= planted  # everything the mask added is skill
    assert len(found) >= len(planted) - 1  # the score needs all but one planted entry
    scores = [h["score"] for h in learned.history if h.get("scored")]
    assert learned.history[0]["score"] < 1.0
    assert learned.history[learned.best_step]["score"] == max(scores) == 1.0
    assert [e["step"] for e in events] == list(range(1, 11))
    assert {"loss", "train_accuracy", "dev_accuracy", "mask_size", "total"} <= set(events[-1])
    # the graft built from the mask gives the same score as recorded for its step
    patch = build_patch(base.parameters, ft, learned.mask, task="t", spec=SPEC, base_fingerprint=base.fingerprint)
    model = TaskModel(base.encoder, SPEC, base.tokenizer)
    tokenization = Tokenization(base.tokenizer, SPEC)
    with grafted(base.parameters, patch):
        logits = predict_logits(model, tokenization, tokenization.encode_many(examples))
    assert float((logits.argmax(-1) == torch.tensor([e.label for e in examples])).float().mean()) == 1.0


def test_size_cap_holds_and_runs_are_deterministic(fresh_tiny: BaseModel) -> None:
    base = fresh_tiny
    ft, planted, examples = planted_task(base)
    eligible = sum(base.parameters[n].numel() for n in EligibleRule().select(base.parameters))
    sparsity = (16 * base.hidden_size + 0.5) / eligible
    config = LocalizeConfig(sparsity=sparsity, steps=6, bias=5.0, max_step=4.0, budget=520, seed=7)
    first = localize(base, ft, SPEC, examples[:16], examples[16:], config)
    second = localize(base, ft, SPEC, examples[:16], examples[16:], config)
    assert first.size == mask_size(first.mask) <= 520
    assert all(h["mask_size"] <= 520 for h in first.history if h.get("scored"))
    assert all(torch.equal(first.mask[n], second.mask[n]) for n in first.mask)
    assert first.history == second.history
    uncapped = localize(base, ft, SPEC, examples[:16], examples[16:], replace(config, budget=None))
    assert max(h["mask_size"] for h in uncapped.history) > 520  # the cap was binding


def test_best_mask_selection_rule() -> None:
    best = _BestMask()
    empty: dict[str, torch.Tensor] = {}
    assert best.offer(0, 0.5, 10, empty)
    assert best.offer(1, 0.7, 20, empty)
    assert not best.offer(2, 0.6, 5, empty)  # worse score, even if smaller
    assert best.offer(3, 0.7, 15, empty)  # same score, smaller mask
    assert not best.offer(4, 0.7, 15, empty)  # same score and size: the earlier step stays
    assert (best.step, best.score, best.size) == (3, 0.7, 15)


def test_cancellation_restores_the_base(fresh_tiny: BaseModel) -> None:
    base = fresh_tiny
    ft, _, examples = planted_task(base)
    saved = snapshot(base)
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(LocalizationCancelled):
        localize(base, ft, SPEC, examples, examples, LocalizeConfig(steps=5, max_step=2.0), should_stop=stop)
    assert len(calls) == 3
    assert_identical(base, saved)


@pytest.mark.slow
def test_cli_localize_and_evaluate_end_to_end(
    real_base: BaseModel, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = snapshot(real_base)
    data = ["--dataset", "sst2", "--k", "8", "--seed", "1", "--data-dir", str(data_dir)]
    ckpt = tmp_path / "ckpt"
    assert main(["finetune", *data, "--epochs", "2", "--out", str(ckpt)]) == 0
    patch_path = tmp_path / "sst2.safetensors"
    args = ["localize", *data, "--checkpoint", str(ckpt), "--sparsity", "1e-3", "--steps", "2", "--max-step", "5"]
    assert main([*args, "--eval-limit", "40", "--out", str(patch_path)]) == 0
    report = json.loads(patch_path.with_suffix(".json").read_text())
    assert report["method"] == "learned" and len(report["history"]) == 3
    assert report["finetune"]["optimizer"] == "sgd" and report["finetune"]["l1"] == 0.0
    assert 0 < report["mask_size"] <= report["k"] * 2
    assert report["evaluation"]["examples"] == 40
    patch = load_patch(patch_path)
    validate_patch(patch, real_base.parameters, real_base.fingerprint, real_base.hidden_size)
    assert patch.mask_size == report["mask_size"] and patch.method == "learned"
    with grafted(real_base.parameters, patch):
        changed = sum(
            int((real_base.parameters[n].view(-1)[i] != saved[n].view(-1)[i]).sum())
            for n, (i, _) in patch.entries.items()
        )
    assert changed > 0
    out = tmp_path / "eval.json"
    evaluate = ["evaluate", *data, "--patch", str(patch_path), "--checkpoint", str(ckpt), "--limit", "40"]
    assert main([*evaluate, "--out", str(out)]) == 0
    evaluation = json.loads(out.read_text())
    assert evaluation["acc_graft"] == report["evaluation"]["acc_graft"]
    assert evaluation["mask"]["size"] == patch.mask_size
    assert_identical(real_base, saved)


@pytest.mark.parametrize("rank", [1, 50])
def test_scale_free_step_moves_the_ranked_entry_by_max_step(tiny_base: BaseModel, rank: int) -> None:
    ft = random_finetune(tiny_base, seed=1)
    config = LocalizeConfig(max_step=2.5, step_rank=rank, lr=1e-9)
    with MaskLearner(tiny_base, ft, SPEC, config) as learner:
        before = {n: s.clone() for n, s in learner.scores.items()}
        generator = torch.Generator().manual_seed(0)
        # heavy-tailed, tiny-scale gradient: the step size must not depend on its scale
        gradient = {n: torch.randn(s.shape, generator=generator) ** 3 * 1e-12 for n, s in learner.scores.items()}
        largest = learner.apply_update(gradient)
        moved = torch.cat([(before[n] - learner.scores[n]).abs().reshape(-1) for n in learner.names])
    assert largest == pytest.approx(2.5)
    ranked = torch.sort(moved, descending=True).values
    assert float(ranked[0]) == pytest.approx(2.5, rel=1e-5)
    assert float(ranked[rank - 1]) == pytest.approx(2.5, rel=1e-5)
    assert float(ranked[rank]) < 2.5


def test_default_settings_move_the_learned_mask_away_from_topk(fresh_tiny: BaseModel) -> None:
    """LocalizeConfig's defaults (shared by the CLI, the jobs and the benchmarks) must really learn: on the planted
    task the learned mask leaves top-k (which holds only the decoy) and scores at least as well."""
    base = fresh_tiny
    ft, planted, examples = planted_task(base)
    train, dev = examples[:16], examples[16:]
    eligible = sum(base.parameters[n].numel() for n in EligibleRule().select(base.parameters))
    sparsity = (16 * base.hidden_size + 0.5) / eligible
    learned = localize(base, ft, SPEC, train, dev, LocalizeConfig(sparsity=sparsity))
    topk = localize(base, ft, SPEC, config=LocalizeConfig(method="topk", sparsity=sparsity))
    assert entries(learned.mask) != entries(topk.mask)
    assert entries(learned.mask) - entries(topk.mask) <= planted
    scores = [h["score"] for h in learned.history if h.get("scored")]
    assert learned.history[learned.best_step]["score"] >= learned.history[0]["score"]  # step 0 is top-k itself
    assert max(scores) == 1.0 and learned.best_step > 0
