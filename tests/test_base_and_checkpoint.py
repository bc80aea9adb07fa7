"""Base loading, fingerprint, key normalisation, the eligible set, and checkpoints in and out."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification

from app.grafting.base import (
    BaseModel,
    EligibleRule,
    eligible_size,
    fingerprint_parameters,
    load_base,
    normalize_state_dict,
)
from app.grafting.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, split_for_base
from app.grafting.heads import Example, HeadSpec, TaskModel, Tokenization, init_classifier_head
from tests.utils.tiny import random_finetune


def test_fingerprint_is_stable_and_sensitive(tiny_base: BaseModel, tiny_base_dir: Path) -> None:
    again = load_base(tiny_base_dir)
    assert again.fingerprint == tiny_base.fingerprint == fingerprint_parameters(tiny_base.parameters)
    params = {n: t.clone() for n, t in tiny_base.parameters.items()}
    name = "encoder.layer.0.output.dense.bias"
    params[name][0] = torch.nextafter(params[name][0], torch.tensor(10.0))
    assert fingerprint_parameters(params) != tiny_base.fingerprint
    renamed = {("x" + n if n == name else n): t for n, t in tiny_base.parameters.items()}
    assert fingerprint_parameters(renamed) != tiny_base.fingerprint


def test_packaged_base_loads_offline(real_base: BaseModel) -> None:
    assert real_base.model_type == "bert"
    assert real_base.num_parameters == 22_565_376  # 22.7M in the folder, less the pooler we keep out of the base
    assert eligible_size(real_base.parameters, EligibleRule()) == 10_646_784
    assert set(real_base.extra_weights) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert real_base.fingerprint.startswith("sha256:")


def test_normalize_keys() -> None:
    state = {
        "bert.encoder.layer.0.output.dense.bias": torch.zeros(1),
        "bert.embeddings.position_ids": torch.zeros(1),
        "classifier.weight": torch.zeros(1),
    }
    assert set(normalize_state_dict(state)) == {"encoder.layer.0.output.dense.bias", "classifier.weight"}
    with pytest.raises(ValueError, match="twice"):
        normalize_state_dict({"bert.pooler.x": torch.zeros(1), "pooler.x": torch.zeros(1)})


def test_eligible_rules(tiny_base: BaseModel) -> None:
    names = list(tiny_base.parameters)
    every = EligibleRule.parse("layers").select(names)
    assert every and all(n.startswith("encoder.layer.") for n in every)
    assert all(n.endswith(".bias") for n in EligibleRule.parse("bias-only").select(names))
    assert not any("LayerNorm" in n for n in EligibleRule.parse("no-layernorm").select(names))
    assert all(n.startswith("encoder.layer.1.") for n in EligibleRule.parse("from-layer=1").select(names))
    assert str(EligibleRule.parse("bias-only,from-layer=1")) == "layers,bias-only,from-layer=1"
    with pytest.raises(ValueError, match="unknown eligible rule"):
        EligibleRule.parse("attention")


def test_classifier_checkpoint_is_standard(tiny_base: BaseModel, tmp_path: Path) -> None:
    """Our classifier checkpoints load in transformers and give the same logits as the engine's head."""
    spec = HeadSpec("classifier", ("neg", "pos", "mid"), classifier_kind="bert-pooler")
    body = random_finetune(tiny_base, seed=5)
    head = init_classifier_head("bert-pooler", 3, tiny_base.hidden_size, tiny_base.extra_weights, seed=5)
    head["classifier.weight"] = torch.randn(3, tiny_base.hidden_size)
    folder = save_checkpoint(tmp_path / "ckpt", tiny_base, body, spec, head)
    reference = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    loaded = split_for_base(load_checkpoint(folder), tiny_base)
    assert set(loaded.head) == set(head)
    assert all(torch.equal(loaded.body[n], body[n]) for n in body)
    tokenization = Tokenization(tiny_base.tokenizer, spec)
    batch = tokenization.collate(tokenization.encode_many([Example("a good film", 0), Example("no", 1, "yes")]))
    encoder = load_base(folder).encoder
    ours = TaskModel(encoder, spec, tiny_base.tokenizer, loaded.head).eval()
    with torch.no_grad():
        expected = reference(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids
        ).logits
        assert torch.allclose(ours(batch), expected, atol=1e-6)
    assert loaded.head_spec("bert") == spec


def test_checkpoint_refusals(tiny_base: BaseModel, tmp_path: Path) -> None:
    body = {n: t.clone() for n, t in tiny_base.parameters.items()}
    (tmp_path / "pickle.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(tmp_path / "pickle.bin")
    wrong = dict(body)
    name = "encoder.layer.0.output.dense.weight"
    wrong[name] = torch.zeros(3, 3)
    save_file(wrong, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=r"encoder.layer.0.output.dense.weight: shape \(3, 3\)"):
        split_for_base(load_checkpoint(tmp_path / "shape.safetensors"), tiny_base)
    nan = dict(body)
    nan[name] = body[name].clone()
    nan[name][0, 0] = float("inf")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        split_for_base(load_checkpoint(tmp_path / "nan.safetensors"), tiny_base)
    missing = {n: t for n, t in body.items() if "layer.1." not in n}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="missing base parameters"):
        split_for_base(load_checkpoint(tmp_path / "missing.safetensors"), tiny_base)
    stray = {**body, "lm_head.bias": torch.zeros(4)}
    save_file(stray, str(tmp_path / "stray.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head.bias: not a parameter"):
        split_for_base(load_checkpoint(tmp_path / "stray.safetensors"), tiny_base)


def test_zipped_checkpoint(tiny_base: BaseModel, tmp_path: Path) -> None:
    spec = HeadSpec("prompt", ("a", "b"), "{text} It was {mask} .", ("terrible", "great"))
    folder = save_checkpoint(tmp_path / "ckpt", tiny_base, tiny_base.parameters, spec)
    archive = tmp_path / "ckpt.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("model.safetensors", "config.json"):
            zf.write(folder / name, f"my-model/{name}")
        zf.writestr("../../evil.txt", "x")
    loaded = load_checkpoint(archive, extract_dir=tmp_path / "unzipped")
    assert loaded.head_spec("bert") == spec
    assert not (tmp_path.parent / "evil.txt").exists()
    assert json.loads((tmp_path / "unzipped" / "config.json").read_text())["skillgraft"]["head"]["mode"] == "prompt"


def test_wrapping_the_shared_encoder_keeps_it_in_eval_mode(tiny_base: BaseModel) -> None:
    """Scoring through a TaskModel must not leave the shared base with dropout switched on."""
    from app.grafting.inference import predict_logits

    spec = HeadSpec("classifier", ("a", "b"), classifier_kind="bert-pooler")
    head = init_classifier_head("bert-pooler", 2, tiny_base.hidden_size, tiny_base.extra_weights, seed=0)
    model = TaskModel(tiny_base.encoder, spec, tiny_base.tokenizer, head)
    assert not model.training and not model.dropout.training
    tokenization = Tokenization(tiny_base.tokenizer, spec)
    first = predict_logits(model, tokenization, tokenization.encode_many([Example("same text", 0)]))
    assert not tiny_base.encoder.training
    again = predict_logits(model, tokenization, tokenization.encode_many([Example("same text", 0)]))
    assert torch.equal(first, again)
