"""The one graft pipeline: checkpoint → localized mask → patch → evaluation report.

``graft`` is what ``skillgraft localize``, the background jobs and the benchmarks call, so the three cannot drift
apart in settings or metrics. Its inputs say which examples do what (``GraftSplits``): the mask is trained on
``train`` and chosen on ``train`` + ``dev``; the report is computed on ``evaluation`` and says which kind of set
that is:

* ``test``: a test set the caller gave;
* ``held-out``: a seeded share of the caller's data that nothing else touched (``split_for_evaluation``);
* ``selection``: too little data to hold any out, so the report is on the examples the mask was chosen on and
  is labelled as such (optimistic by construction).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from app.grafting.base import BaseModel, EligibleRule
from app.grafting.calibration import reliability_bins
from app.grafting.checkpoint import Checkpoint
from app.grafting.evaluate import Evaluator
from app.grafting.heads import Example, HeadSpec
from app.grafting.localize import (
    LocalizeConfig,
    LocalizeResult,
    ProgressCallback,
    StopCheck,
    data_free_mask,
    localize,
)
from app.grafting.patch import GraftPatch, build_patch

EvaluatedOn = Literal["test", "held-out", "selection"]
# Hold out this share of the data when no test set is given, if that leaves at least MIN_HELD_OUT examples.
HELD_OUT_FRACTION = 0.2
MIN_HELD_OUT = 20
SELECTION_NOTE = (
    "selection-set figures: no test file was given and the data were too small to hold any out, so these are "
    "scored on the examples the mask was chosen on (optimistic)"
)


@dataclass
class GraftSplits:
    train: list[Example]
    dev: list[Example]
    evaluation: list[Example]
    evaluated_on: EvaluatedOn


def split_for_evaluation(
    train: Sequence[Example], dev: Sequence[Example], test: Sequence[Example] = (), seed: int = 0
) -> GraftSplits:
    """The splits a graft uses: the given test set; else a seeded held-out share of the training data; else
    (fewer than ``MIN_HELD_OUT / HELD_OUT_FRACTION`` examples) the selection set, labelled so."""
    if test:
        return GraftSplits(list(train), list(dev), list(test), "test")
    held = int(len(train) * HELD_OUT_FRACTION)
    if held >= MIN_HELD_OUT:
        shuffled = list(train)
        random.Random(f"held-out:{seed}").shuffle(shuffled)
        return GraftSplits(shuffled[held:], list(dev), shuffled[:held], "held-out")
    return GraftSplits(list(train), list(dev), [*train, *dev], "selection")


@dataclass
class GraftOutcome:
    patch: GraftPatch
    localized: LocalizeResult
    # the evaluation report (empty when not evaluated); the same dict is the patch's metrics
    report: dict[str, Any] = field(default_factory=dict)


def graft(
    base: BaseModel,
    checkpoint: Checkpoint,
    spec: HeadSpec,
    splits: GraftSplits,
    config: LocalizeConfig,
    *,
    task: str,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    evaluate: bool = True,
    extra: dict[str, Any] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> GraftOutcome:
    """Localize ``checkpoint``'s skill on ``base``, build the patch and (``evaluate``) report on the evaluation
    split. The base comes back bit-identical; the head tensors of ``spec``'s kind travel in the patch densely.
    ``on_phase`` hears "localize" and "evaluate" as each starts (job phases and their timings)."""
    if on_phase is not None:
        on_phase("localize")
    head = checkpoint.head_tensors(spec)
    localized = localize(
        base, checkpoint.body, spec, splits.train, splits.dev, config, head, progress=progress, should_stop=should_stop
    )
    patch = build_patch(
        base.parameters,
        checkpoint.body,
        localized.mask,
        task=task,
        spec=spec,
        base_fingerprint=base.fingerprint,
        head=head,
        eligible_rule=str(EligibleRule.parse(config.eligible)),
        eligible_size=localized.eligible_size,
        method=localized.method,
        source_checkpoint_sha256=checkpoint.sha256,
        extra={**(extra or {}), "localize": localized.summary()},
    )
    outcome = GraftOutcome(patch, localized)
    if evaluate and splits.evaluation:
        if on_phase is not None:
            on_phase("evaluate")
        outcome.report = evaluation_report(base, checkpoint, spec, patch, splits, config.max_length)
        patch.metrics = outcome.report
    return outcome


def evaluation_report(
    base: BaseModel,
    checkpoint: Checkpoint,
    spec: HeadSpec,
    patch: GraftPatch,
    splits: GraftSplits,
    max_length: int = 128,
) -> dict[str, Any]:
    """``Evaluator.report`` on the evaluation split, with what that split is and the reliability bins of θ_ft
    and the graft (the dashboard's reliability diagram)."""
    evaluator = Evaluator(
        base,
        spec,
        checkpoint.body,
        splits.evaluation,
        ft_head=patch.head or None,
        head_seed=checkpoint.head_seed,
        max_length=max_length,
    )
    logits = evaluator.graft_logits(patch)
    report = evaluator.report(patch, logits)
    report["evaluated_on"] = splits.evaluated_on
    if splits.evaluated_on == "selection":
        report["evaluation_note"] = SELECTION_NOTE
    report["reliability"] = {
        "ft": reliability_bins(evaluator.ft_logits, evaluator.labels),
        "graft": reliability_bins(logits, evaluator.labels),
    }
    if spec.mode == "classifier":
        # the dense head can carry much of a skill on its own: show what a random mask of the same size keeps
        report["head_entries"] = patch.head_entries
        report["random_mask"] = _random_mask_baseline(base, checkpoint, patch, evaluator)
    return report


def _random_mask_baseline(
    base: BaseModel, checkpoint: Checkpoint, patch: GraftPatch, evaluator: Evaluator
) -> dict[str, Any]:
    rule = EligibleRule.parse(patch.eligible_rule)
    names = rule.select(base.parameters)
    mask = data_free_mask("random", base.parameters, checkpoint.body, names, patch.mask_size, seed=0)
    random_patch = build_patch(
        base.parameters,
        checkpoint.body,
        mask,
        task=patch.task,
        spec=patch.spec,
        base_fingerprint=patch.base_fingerprint,
        head=patch.head,
        eligible_rule=patch.eligible_rule,
        eligible_size=patch.eligible_size,
        method="random",
    )
    report = evaluator.report(random_patch)
    keys = ("acc_graft", "ece_graft", "relative_gain", "gap_closed_from_body_head", "agreement_with_ft")
    return {"mask_size": random_patch.mask_size, **{key: report.get(key) for key in keys}}
