"""Evaluating a graft against the models it sits between: θ_pre, θ_ft and (classifier mode) body_pre + head_ft.

Report fields (docs/method.md, "What is measured"): accuracies, graft/ft ratio, relative gain
(acc_graft − acc_pre)/(acc_ft − acc_pre), agreement of the graft's predictions with θ_ft's, expected calibration
error (10 equal-width confidence bins), and where the mask sits (entries per layer and per module type).

In classifier mode θ_pre has no head of its own: it is scored with the head fine-tuning started from (re-drawn
with the checkpoint's training seed), and "pretrained body + fine-tuned head" is reported beside it, with the
share of the gap from it to θ_ft that the graft closes.

The reference predictions (θ_pre, θ_ft, body + head) are computed once per example set by ``Evaluator`` and
reused for every patch, since a benchmark scores many masks against the same checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from app.grafting.base import BaseModel, layer_of, module_type_of
from app.grafting.heads import Example, HeadSpec, TaskModel, Tokenization, default_classifier_kind, init_classifier_head
from app.grafting.inference import predict_logits
from app.grafting.patch import GraftPatch, grafted, swapped_weights

ECE_BINS = 10


def expected_calibration_error(
    probs: torch.Tensor, labels: Sequence[int] | torch.Tensor, bins: int = ECE_BINS
) -> float:
    """Σ_b (|b|/n)·|acc_b − conf_b| over ``bins`` equal-width bins (lo, hi] of the max-probability confidence."""
    if probs.shape[0] == 0:
        return float("nan")
    target = torch.as_tensor(labels)
    confidence, predicted = probs.float().max(dim=-1)
    correct = (predicted == target).float()
    # ceil(c·B) − 1 puts c in (lo, hi]; a confidence of exactly 0 (impossible for a softmax) falls in bin 0
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    total = 0.0
    n = probs.shape[0]
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        if count:
            total += count / n * abs(float(correct[members].mean()) - float(confidence[members].mean()))
    return total


NO_GAIN_NOTE = "fine-tuning did not improve on the pretrained model here, so the relative gain is undefined"


def relative_gain(acc_graft: float, acc_pre: float, acc_ft: float) -> float | None:
    """(acc_graft − acc_pre)/(acc_ft − acc_pre); None when fine-tuning gained nothing to share (acc_ft ≤ acc_pre:
    the ratio would be meaningless, e.g. 0.96 for a graft worse than the pretrained model)."""
    gap = acc_ft - acc_pre
    if gap <= 1e-12:
        return None
    return (acc_graft - acc_pre) / gap


def mask_breakdown(counts: Mapping[str, int]) -> dict[str, Any]:
    """Entries per encoder layer and per module type, from per-tensor entry counts."""
    per_layer: dict[str, int] = {}
    per_type: dict[str, int] = {}
    for name, count in counts.items():
        if not count:
            continue
        layer = layer_of(name)
        key = "none" if layer is None else str(layer)
        per_layer[key] = per_layer.get(key, 0) + int(count)
        kind = module_type_of(name) + ("-bias" if name.endswith(".bias") else "")
        per_type[kind] = per_type.get(kind, 0) + int(count)
    return {
        "size": int(sum(counts.values())),
        "per_layer": dict(sorted(per_layer.items(), key=lambda item: (len(item[0]), item[0]))),
        "per_module_type": dict(sorted(per_type.items())),
    }


def mask_counts(mask: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {name: int(m.sum()) for name, m in mask.items()}


def patch_counts(patch: GraftPatch) -> dict[str, int]:
    return {name: int(indices.numel()) for name, (indices, _) in patch.entries.items()}


def _summary(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    probs = torch.softmax(logits.float(), dim=-1)
    return {
        "accuracy": float((logits.argmax(dim=-1) == labels).float().mean()) if len(labels) else float("nan"),
        "ece": expected_calibration_error(probs, labels),
    }


class Evaluator:
    """Reference predictions for one checkpoint on one example set, then a report per patch."""

    def __init__(
        self,
        base: BaseModel,
        spec: HeadSpec,
        ft_body: Mapping[str, torch.Tensor],
        examples: Sequence[Example],
        ft_head: Mapping[str, torch.Tensor] | None = None,
        pre_head: Mapping[str, torch.Tensor] | None = None,
        head_seed: int = 0,
        batch_size: int = 256,
        max_length: int = 128,
    ) -> None:
        if not examples:
            raise ValueError("no examples to evaluate on")
        self.base = base
        self.spec = spec
        self.batch_size = batch_size
        self.tokenization = Tokenization(base.tokenizer, spec, max_length, base.family)
        self.encoded = self.tokenization.encode_many(examples)
        self.labels = torch.tensor([e.label for e in examples])
        self.ft_head = dict(ft_head or {})
        classifier = spec.mode == "classifier"
        if classifier and pre_head is None:
            # the head fine-tuning started from: the base's pooler where it has one, the rest re-drawn by seed
            pre_head = init_classifier_head(
                spec.classifier_kind or default_classifier_kind(base.model_type),
                spec.num_labels,
                base.hidden_size,
                base.extra_weights,
                head_seed,
            )
        self.pre_logits = self._logits(dict(pre_head) if classifier and pre_head else None)
        with swapped_weights(base.parameters, ft_body):
            self.ft_logits = self._logits(self.ft_head or None)
        self.body_head_logits = self._logits(self.ft_head) if classifier else None
        self.ft_predictions = self.ft_logits.argmax(dim=-1)

    def _logits(self, head: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        model = TaskModel(self.base.encoder, self.spec, self.base.tokenizer, dict(head) if head else None)
        return predict_logits(model, self.tokenization, self.encoded, self.batch_size)

    def reference(self) -> dict[str, Any]:
        pre = _summary(self.pre_logits, self.labels)
        ft = _summary(self.ft_logits, self.labels)
        out: dict[str, Any] = {
            "examples": len(self.labels),
            "acc_pre": pre["accuracy"],
            "acc_ft": ft["accuracy"],
            "ece_pre": pre["ece"],
            "ece_ft": ft["ece"],
        }
        if self.body_head_logits is not None:
            body_head = _summary(self.body_head_logits, self.labels)
            out["acc_body_head"] = body_head["accuracy"]
            out["ece_body_head"] = body_head["ece"]
            out["relative_gain_body_head"] = relative_gain(body_head["accuracy"], pre["accuracy"], ft["accuracy"])
        return out

    def graft_logits(self, patch: GraftPatch) -> torch.Tensor:
        with grafted(self.base.parameters, patch):
            return self._logits(patch.head or None)

    def report(self, patch: GraftPatch, logits: torch.Tensor | None = None) -> dict[str, Any]:
        """Accuracies, ratio, relative gain(s), agreement, ECE and the mask's layout for one patch (``logits``:
        the graft's, if the caller already has them)."""
        logits = self.graft_logits(patch) if logits is None else logits
        graft = _summary(logits, self.labels)
        ref = self.reference()
        acc_ft = ref["acc_ft"]
        out: dict[str, Any] = {
            **ref,
            "acc_graft": graft["accuracy"],
            "ece_graft": graft["ece"],
            "ratio": graft["accuracy"] / acc_ft if acc_ft else None,
            "relative_gain": relative_gain(graft["accuracy"], ref["acc_pre"], acc_ft),
            "agreement_with_ft": float((logits.argmax(dim=-1) == self.ft_predictions).float().mean()),
            "mask": {
                **mask_breakdown(patch_counts(patch)),
                "eligible_size": patch.eligible_size,
                "sparsity": patch.sparsity,
            },
        }
        if out["relative_gain"] is None:
            out["relative_gain_note"] = NO_GAIN_NOTE
        if "acc_body_head" in ref:
            out["gap_closed_from_body_head"] = relative_gain(graft["accuracy"], ref["acc_body_head"], acc_ft)
        return out


def evaluate(
    base: BaseModel,
    spec: HeadSpec,
    ft_body: Mapping[str, torch.Tensor],
    patch: GraftPatch,
    examples: Sequence[Example],
    ft_head: Mapping[str, torch.Tensor] | None = None,
    head_seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """One patch against its checkpoint on ``examples``: see ``Evaluator.report``."""
    evaluator = Evaluator(base, spec, ft_body, examples, ft_head, head_seed=head_seed, batch_size=batch_size)
    return evaluator.report(patch)
