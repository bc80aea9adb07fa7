"""Fine-tuning on a small real subset raises train accuracy in both head modes; the CLI writes a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.cli import main
from app.grafting.base import BaseModel
from app.grafting.checkpoint import load_checkpoint, split_for_base
from app.grafting.data import REGISTRY, load_dataset, sample_k_shot
from app.grafting.finetune import FinetuneConfig, finetune
from app.grafting.heads import TaskModel, Tokenization, init_classifier_head
from app.grafting.inference import accuracy, predict_logits


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "lr"), [("prompt", 2e-2), ("classifier", 5e-2)])
def test_finetune_raises_train_accuracy(real_base: BaseModel, data_dir: Path, mode: str, lr: float) -> None:
    train, dev = sample_k_shot(load_dataset("sst2", data_dir).train, 16, seed=0)
    spec = REGISTRY["sst2"].head_spec(mode, "bert-pooler")
    head = init_classifier_head("bert-pooler", 2, real_base.hidden_size, real_base.extra_weights, 0)
    before_model = TaskModel(real_base.encoder, spec, real_base.tokenizer, head if mode == "classifier" else None)
    tokenization = Tokenization(real_base.tokenizer, spec)
    labels = [e.label for e in train]
    before = accuracy(predict_logits(before_model, tokenization, tokenization.encode_many(train)), labels)
    pre = {n: t.clone() for n, t in real_base.parameters.items()}
    result = finetune(real_base, spec, train, dev, FinetuneConfig(lr=lr, epochs=5, seed=0))
    assert result.metrics["train_accuracy"] >= before + 0.2, (before, result.metrics)
    # the base in memory is untouched, embeddings are frozen, encoder layers moved
    assert all(real_base.parameters[n].equal(t) for n, t in pre.items())
    assert result.body["embeddings.word_embeddings.weight"].equal(pre["embeddings.word_embeddings.weight"])
    assert not result.body["encoder.layer.0.output.dense.weight"].equal(pre["encoder.layer.0.output.dense.weight"])
    assert (
        set(result.head) == {"pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias"}
    ) == (mode == "classifier")


def test_finetune_cli_with_user_data(
    tiny_base_dir: Path, tiny_base: BaseModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = tmp_path / "train.jsonl"
    rows = [
        {"text": f"{w} movie number {i}", "label": "pos" if w == "good" else "neg"}
        for i in range(12)
        for w in ("good", "bad")
    ]
    train.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "ckpt"
    code = main(
        [
            "finetune",
            "--base-model",
            str(tiny_base_dir),
            "--train",
            str(train),
            "--mode",
            "classifier",
            "--epochs",
            "2",
            "--l1",
            "1e-4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 6 and 0 <= report["train_accuracy"] <= 1
    checkpoint = split_for_base(load_checkpoint(out), tiny_base)
    config = checkpoint.config["skillgraft"]
    assert config["training"]["optimizer"] == "sgd" and config["training"]["l1"] == 1e-4
    assert checkpoint.head_spec("bert").labels == ("neg", "pos")


def test_finetune_cli_reports_bad_input(
    tiny_base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "x"}\n')
    code = main(["finetune", "--base-model", str(tiny_base_dir), "--train", str(bad), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "'label' is missing" in capsys.readouterr().err
