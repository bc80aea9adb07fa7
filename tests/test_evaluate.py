"""Evaluation: ECE against a hand computation, relative gain, mask layout, and graft reports at the extremes
(empty mask = θ_pre, full mask = θ_ft) in both head modes, with the base restored exactly."""

from __future__ import annotations

import pytest
import torch

from app.grafting.base import BaseModel, EligibleRule
from app.grafting.evaluate import (
    Evaluator,
    expected_calibration_error,
    mask_breakdown,
    relative_gain,
    swapped_weights,
)
from app.grafting.heads import Example, HeadSpec, init_classifier_head
from app.grafting.patch import build_patch
from tests.utils.tiny import random_finetune

PROMPT = HeadSpec("prompt", ("negative", "positive"), "{text} It was {mask} .", ("terrible", "great"))
CLASSIFIER = HeadSpec("classifier", ("negative", "positive"), classifier_kind="bert-pooler")
TEXTS = ["a long film", "the music was loud", "old road", "new day at the city", "a story", "short scene", "the plot"]


def test_ece_matches_a_hand_computation() -> None:
    probs = torch.tensor([[0.95, 0.05], [0.15, 0.85], [0.62, 0.38], [0.45, 0.55], [0.5, 0.5], [0.08, 0.92]])
    labels = [0, 0, 0, 1, 1, 1]
    # confidences 0.95 (right), 0.85 (wrong), 0.62 (right), 0.55 (right), 0.5 (argmax picks 0: wrong), 0.92 (right)
    # bins (0.9,1]: {0.95, 0.92} acc 1, conf 0.935 -> 2/6·0.065
    #      (0.8,0.9]: {0.85} acc 0 -> 1/6·0.85;  (0.6,0.7]: {0.62} acc 1 -> 1/6·0.38
    #      (0.5,0.6]: {0.55} acc 1 -> 1/6·0.45;  (0.4,0.5]: {0.5} acc 0 -> 1/6·0.5
    expected = (2 * 0.065 + 0.85 + 0.38 + 0.45 + 0.5) / 6
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-6)
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, [0, 1]) == 0.0


def test_relative_gain_and_mask_breakdown() -> None:
    assert relative_gain(0.8, 0.5, 0.9) == pytest.approx(0.75)
    assert relative_gain(0.7, 0.7, 0.7) is None
    layout = mask_breakdown(
        {
            "encoder.layer.0.attention.self.query.weight": 3,
            "encoder.layer.0.attention.self.query.bias": 1,
            "encoder.layer.2.output.dense.weight": 5,
            "encoder.layer.10.intermediate.dense.weight": 2,
            "encoder.layer.2.output.LayerNorm.weight": 0,
        }
    )
    assert layout["size"] == 11
    assert layout["per_layer"] == {"0": 4, "2": 5, "10": 2}
    assert layout["per_module_type"] == {"ffn-in": 2, "ffn-out": 5, "query": 3, "query-bias": 1}


@pytest.mark.parametrize("spec", [PROMPT, CLASSIFIER], ids=["prompt", "classifier"])
def test_reports_at_the_extremes(tiny_base: BaseModel, spec: HeadSpec) -> None:
    params = tiny_base.parameters
    saved = {n: t.detach().clone() for n, t in params.items()}
    ft = random_finetune(tiny_base, seed=4, scale=0.5)
    examples = [Example(text, i % 2) for i, text in enumerate(TEXTS)]
    head = (
        init_classifier_head("bert-pooler", 2, tiny_base.hidden_size, tiny_base.extra_weights, 9)
        if spec.mode == "classifier"
        else None
    )
    evaluator = Evaluator(tiny_base, spec, ft, examples, ft_head=head, head_seed=0)
    names = EligibleRule().select(params)
    full = build_patch(
        params,
        ft,
        {n: torch.ones_like(params[n], dtype=torch.bool) for n in names},
        task="t",
        spec=spec,
        base_fingerprint=tiny_base.fingerprint,
        head=head,
    )
    empty = build_patch(
        params,
        ft,
        {n: torch.zeros_like(params[n], dtype=torch.bool) for n in names},
        task="t",
        spec=spec,
        base_fingerprint=tiny_base.fingerprint,
        head=head,
    )
    full_report = evaluator.report(full)
    assert full_report["acc_graft"] == full_report["acc_ft"]
    assert full_report["agreement_with_ft"] == 1.0
    assert full_report["ece_graft"] == pytest.approx(full_report["ece_ft"], abs=1e-6)
    assert full_report["mask"]["size"] == full_report["mask"]["eligible_size"]
    assert set(full_report["mask"]["per_layer"]) == {"0", "1"}
    empty_report = evaluator.report(empty)
    assert empty_report["mask"]["size"] == 0
    if spec.mode == "prompt":
        # an empty prompt-mode graft is θ_pre itself
        assert empty_report["acc_graft"] == empty_report["acc_pre"]
        assert "acc_body_head" not in empty_report
    else:
        # an empty classifier graft is the pretrained body with the fine-tuned head
        assert empty_report["acc_graft"] == empty_report["acc_body_head"]
        assert torch.equal(evaluator.graft_logits(empty), evaluator.body_head_logits)
        assert "gap_closed_from_body_head" in empty_report
    for name, tensor in params.items():
        assert torch.equal(tensor, saved[name]), name


def test_swapped_weights_restores_exactly(tiny_base: BaseModel) -> None:
    params = tiny_base.parameters
    saved = {n: t.detach().clone() for n, t in params.items()}
    ft = random_finetune(tiny_base, seed=5, scale=1e-3)
    with pytest.raises(RuntimeError), swapped_weights(params, ft):
        name = "encoder.layer.0.output.dense.weight"
        assert torch.equal(params[name], ft[name])
        raise RuntimeError("boom")
    for name, tensor in params.items():
        assert torch.equal(tensor, saved[name]), name
