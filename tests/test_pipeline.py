"""The one graft pipeline: which examples do what, honest report labels, and checkpoints from another base."""

from __future__ import annotations

import pytest
import torch

from app.grafting.base import BaseModel
from app.grafting.checkpoint import Checkpoint, CheckpointBaseMismatch, check_same_base, split_for_base
from app.grafting.evaluate import relative_gain
from app.grafting.heads import Example, HeadSpec, init_classifier_head
from app.grafting.localize import LocalizeConfig
from app.grafting.pipeline import MIN_HELD_OUT, graft, split_for_evaluation
from tests.utils.tiny import random_finetune, tiny_prompt_spec


def examples(n: int, offset: int = 0) -> list[Example]:
    return [Example(f"example number {offset + i}", i % 2) for i in range(n)]


def test_a_given_test_set_is_used_as_it_is() -> None:
    train, dev, test = examples(40), examples(10, 100), examples(7, 200)
    splits = split_for_evaluation(train, dev, test)
    assert (splits.train, splits.dev, splits.evaluation, splits.evaluated_on) == (train, dev, test, "test")


def test_without_a_test_set_a_seeded_share_is_held_out_and_touched_by_nothing_else() -> None:
    train, dev = examples(200), examples(20, 1000)
    splits = split_for_evaluation(train, dev, seed=3)
    assert splits.evaluated_on == "held-out" and len(splits.evaluation) == 40
    assert not {e.text for e in splits.evaluation} & {e.text for e in [*splits.train, *splits.dev]}
    assert sorted(e.text for e in [*splits.train, *splits.evaluation]) == sorted(e.text for e in train)
    assert split_for_evaluation(train, dev, seed=3).evaluation == splits.evaluation  # deterministic


def test_too_little_data_is_labelled_as_selection_set() -> None:
    train, dev = examples(MIN_HELD_OUT * 5 - 1), examples(4, 1000)
    splits = split_for_evaluation(train, dev)
    assert splits.evaluated_on == "selection" and splits.evaluation == [*train, *dev]


def test_relative_gain_is_undefined_when_fine_tuning_did_not_help() -> None:
    assert relative_gain(0.7, 0.5, 0.9) == pytest.approx(0.5)
    assert relative_gain(0.49, 0.6, 0.6) is None
    assert relative_gain(0.59, 0.6, 0.55) is None  # would read 0.2 "gain" for a graft worse than θ_pre


def test_graft_reports_what_it_was_evaluated_on(tiny_any: BaseModel) -> None:
    base = tiny_any
    spec = tiny_prompt_spec(base)
    checkpoint = Checkpoint(body=random_finetune(base, seed=4), head={})
    splits = split_for_evaluation(examples(12), examples(4, 100))
    outcome = graft(base, checkpoint, spec, splits, LocalizeConfig(sparsity=1e-3, steps=2), task="demo")
    report = outcome.report
    assert report["evaluated_on"] == "selection" and "evaluation_note" in report
    assert report["examples"] == 16 and len(report["reliability"]["graft"]) == 10
    assert outcome.patch.metrics is report and outcome.patch.method == "learned"
    assert outcome.patch.extra["localize"]["config"]["max_step"] == LocalizeConfig().max_step


def test_a_checkpoint_from_another_base_is_refused(tiny_base: BaseModel) -> None:
    body = random_finetune(tiny_base, seed=2)
    check_same_base(Checkpoint(body=body, head={}), tiny_base)  # a fine-tune of this base passes
    declared = Checkpoint(body=body, head={}, config={"skillgraft": {"base_fingerprint": "sha256:" + "0" * 64}})
    with pytest.raises(CheckpointBaseMismatch, match="fine-tuned from base sha256:0000"):
        check_same_base(declared, tiny_base)
    other = dict(body)
    other["embeddings.word_embeddings.weight"] = torch.randn_like(body["embeddings.word_embeddings.weight"])
    with pytest.raises(CheckpointBaseMismatch, match="embeddings.word_embeddings.weight"):
        split_for_base(Checkpoint(body=other, head={}), tiny_base)


def test_the_pretrained_head_is_drawn_with_the_checkpoints_seed(
    tiny_base: BaseModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Classifier mode scores θ_pre with the head fine-tuning started from: the checkpoint's seed, not 0."""
    import app.grafting.pipeline as pipeline

    seen: list[int] = []
    real = pipeline.Evaluator

    def recording(*args: object, **kwargs: object) -> object:
        seen.append(int(kwargs["head_seed"]))  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "Evaluator", recording)
    spec = HeadSpec("classifier", ("a", "b"), classifier_kind="bert-pooler")
    head = init_classifier_head("bert-pooler", 2, tiny_base.hidden_size, tiny_base.extra_weights, 7)
    config = {"skillgraft": {"training": {"seed": 7}}}
    checkpoint = Checkpoint(body=random_finetune(tiny_base, seed=5), head=head, config=config)
    assert checkpoint.head_seed == 7
    splits = split_for_evaluation(examples(10), examples(4, 100))
    graft(tiny_base, checkpoint, spec, splits, LocalizeConfig(method="topk", sparsity=1e-3), task="seeded")
    assert seen == [7]
