"""Factories for tests: tiny random BERT and Llama folders (real tokenizers, few parameters) and hand-made
patches."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from app.grafting.base import BaseModel, EligibleRule, converted_gguf, load_base, packaged_base_path
from app.grafting.heads import HeadSpec, default_classifier_kind, init_classifier_head
from app.grafting.patch import GraftPatch, build_patch

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_tiny_bert(folder: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a randomly initialised 2-layer BERT with the packaged model's tokenizer into ``folder``."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
    )
    BertModel(config, add_pooling_layer=True).save_pretrained(folder, safe_serialization=True)
    source = packaged_base_path()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    return folder


def make_tiny_llama(folder: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a randomly initialised 2-layer Llama (tied embeddings, RMSNorm, grouped KV heads) with SmolLM2's
    tokenizer into ``folder``: the decoder family at a size the maths tests run in milliseconds."""
    source = converted_gguf(packaged_base_path("smollm2-135m-instruct"))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # RMSNorm weights start at 1: spread them so a graft of one of them shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn(param.shape) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    return folder


def load_tiny(folder: Path) -> BaseModel:
    return load_base(folder, name="tiny-bert")


def tiny_prompt_spec(base: BaseModel, labels: tuple[str, ...] = ("negative", "positive")) -> HeadSpec:
    """A prompt head that suits the base's family: a mask template (encoder) or a next-word template (decoder)."""
    template = "{text} It was {mask} ." if base.family == "encoder" else "Review: {text}\nIt was"
    return HeadSpec("prompt", labels, template, ("terrible", "great", "okay")[: len(labels)])


def random_finetune(base: BaseModel, seed: int = 1, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """θ_ft = θ_pre + noise on the eligible tensors (embeddings untouched), like a fine-tune's task vector."""
    generator = torch.Generator().manual_seed(seed)
    rule = EligibleRule()
    out = {}
    for name, tensor in base.parameters.items():
        t = tensor.detach().clone()
        if rule.admits(name):
            t += torch.randn(t.shape, generator=generator) * scale
        out[name] = t
    return out


def random_mask(base: BaseModel, fraction: float, seed: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(tensor.shape, generator=generator) < fraction
        for name, tensor in base.parameters.items()
        if EligibleRule().admits(name)
    }


def make_patch(
    base: BaseModel,
    task: str = "demo",
    mode: str = "prompt",
    fraction: float = 0.01,
    seed: int = 1,
    labels: tuple[str, ...] = ("negative", "positive"),
) -> GraftPatch:
    """A valid patch for ``base``: random fine-tune values on a random mask, in either head mode."""
    ft = random_finetune(base, seed)
    mask = random_mask(base, fraction, seed + 100)
    if mode == "prompt":
        spec = tiny_prompt_spec(base, labels)
        head = None
    else:
        kind = default_classifier_kind(base.model_type) if base.family == "decoder" else "bert-pooler"
        spec = HeadSpec("classifier", labels, classifier_kind=kind)
        head = init_classifier_head(kind, len(labels), base.hidden_size, base.extra_weights, seed)
    return build_patch(
        base.parameters, ft, mask, task=task, spec=spec, base_fingerprint=base.fingerprint, head=head, method="random"
    )
