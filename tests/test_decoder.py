"""The decoder family (Llama-architecture causal LMs) on a tiny random Llama: prompt scoring is the LM's own
next-token logit, heads refuse what a decoder cannot read, and RMSNorm entries mix exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from app.engine.service import TextInput
from app.grafting.base import (
    BaseModel,
    EligibleRule,
    eligible_size,
    fingerprint_parameters,
    is_norm,
    load_base,
    module_type_of,
)
from app.grafting.heads import Example, HeadError, HeadSpec, TaskModel, Tokenization, label_word_ids
from app.grafting.patch import GraftPatch, PatchError, build_patch, patch_to_bytes, validate_for_base
from tests.utils.serving import TEXTS, Reference, checksum, make_service
from tests.utils.tiny import random_finetune, tiny_prompt_spec


def test_decoder_base_loads_with_its_family_and_eligible_set(tiny_llama: BaseModel) -> None:
    assert tiny_llama.family == "decoder" and tiny_llama.model_type == "llama"
    names = list(tiny_llama.parameters)
    eligible = EligibleRule().select(names)
    # every tensor of the decoder layers, never the (tied) embeddings or the final norm
    assert "embed_tokens.weight" not in eligible and "norm.weight" not in eligible
    assert all(name.startswith("layers.") for name in eligible)
    assert {module_type_of(n) for n in eligible} >= {"query", "key", "value", "attn-out", "ffn-gate", "ffn-in"}
    norms = [n for n in eligible if is_norm(n)]
    assert len(norms) == 4  # input and post-attention RMSNorm per layer
    assert not any(is_norm(n) for n in EligibleRule.parse("no-layernorm").select(names))
    assert eligible_size(tiny_llama.parameters, EligibleRule()) == sum(
        tiny_llama.parameters[n].numel() for n in eligible
    )


def test_prompt_logits_are_the_language_models_next_token_logits(tiny_llama: BaseModel, tiny_llama_dir: Path) -> None:
    spec = tiny_prompt_spec(tiny_llama)
    model = TaskModel(tiny_llama.encoder, spec, tiny_llama.tokenizer).eval()
    tokenization = Tokenization(tiny_llama.tokenizer, spec, 64, tiny_llama.family)
    encoded = tokenization.encode_many([Example(text, 0) for text in TEXTS])
    ids = label_word_ids(tiny_llama.tokenizer, spec.label_words or (), "decoder")
    lm = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.inference_mode():
        batched = model(tokenization.collate(encoded))
        for row, item in enumerate(encoded):
            # one example alone, no padding: the LM head's logits of the next token after the template
            next_token = lm(input_ids=torch.tensor([item.input_ids])).logits[0, -1]
            torch.testing.assert_close(batched[row], next_token[ids], rtol=0, atol=1e-5)


def test_decoder_heads_refuse_what_they_cannot_read(tiny_llama: BaseModel) -> None:
    tok = tiny_llama.tokenizer
    with pytest.raises(HeadError, match="start with the same token"):
        label_word_ids(tok, ["positive", " positive"], "decoder")
    with pytest.raises(HeadError, match="may only be last"):
        Tokenization(tok, HeadSpec("prompt", ("a", "b"), "{mask} {text}", ("yes", "no")), 64, "decoder")
    # a trailing {mask} is allowed and means the same as none
    with_mask = Tokenization(tok, HeadSpec("prompt", ("a", "b"), "Q: {text} A: {mask}", ("yes", "no")), 64, "decoder")
    without = Tokenization(tok, HeadSpec("prompt", ("a", "b"), "Q: {text} A:", ("yes", "no")), 64, "decoder")
    assert with_mask.encode(Example("hi", 0)).input_ids == without.encode(Example("hi", 0)).input_ids
    # an encoder template is refused on an encoder without {mask} (checked against the base, not the spec)
    spec = HeadSpec("prompt", ("a", "b"), "Q: {text} A:", ("yes", "no"))
    long_template = HeadSpec("prompt", ("a", "b"), "word " * 200 + "{text}", ("yes", "no"))
    patch = build_patch(
        tiny_llama.parameters,
        tiny_llama.parameters,
        {},
        task="t",
        spec=long_template,
        base_fingerprint=tiny_llama.fingerprint,
    )
    with pytest.raises(PatchError, match="template alone is longer"):
        validate_for_base(patch, tiny_llama, max_length=64)
    patch.spec = spec
    validate_for_base(patch, tiny_llama, max_length=64)


def mixed_logits(base: BaseModel, patch: GraftPatch, store: Path) -> torch.Tensor:
    """The logits of TEXTS with ``patch`` served alone through one mixed batch of a fresh service."""
    service = make_service(base, store, policy="mixed")
    try:
        service.put_patch(patch.task, patch_to_bytes(patch))
        rows, _ = service.prepare([patch.task], [TextInput(t) for t in TEXTS])
        got = torch.stack(service.engine.run(rows, timeout=60))
        assert service.engine.stats.mixed_batches == 1
        return got
    finally:
        service.close()


def test_rmsnorm_entries_mix_exactly(tiny_llama: BaseModel, tmp_path: Path) -> None:
    """A patch of RMSNorm weights only: the mixed path adds d·x̂ at the patched features, matching the graft."""
    ft = random_finetune(tiny_llama, seed=3, scale=0.2)
    mask = {
        name: torch.rand(tensor.shape, generator=torch.Generator().manual_seed(i)) < 0.3
        for i, (name, tensor) in enumerate(tiny_llama.parameters.items())
        if is_norm(name) and name.startswith("layers.")
    }
    spec = tiny_prompt_spec(tiny_llama)
    norms = build_patch(
        tiny_llama.parameters, ft, mask, task="norms", spec=spec, base_fingerprint=tiny_llama.fingerprint
    )
    assert norms.mask_size > 0
    before = checksum(tiny_llama)
    got = mixed_logits(tiny_llama, norms, tmp_path)
    want = Reference(tiny_llama, norms).logits(TEXTS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    plain = Reference(
        tiny_llama,
        build_patch(tiny_llama.parameters, ft, {}, task="none", spec=spec, base_fingerprint=tiny_llama.fingerprint),
    ).logits(TEXTS)
    assert not torch.allclose(got, plain, atol=1e-4), "the norm entries changed nothing"
    assert checksum(tiny_llama) == before


def test_norm_entries_whose_base_weight_is_zero_mix_exactly(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """x̂ is read off the norm's output as y/w; where the base weight is 0 that is impossible and the hook
    normalises the input again. A patch that revives a zeroed RMSNorm weight must still match the graft."""
    base = load_base(tiny_llama_dir, name="tiny-llama-zeroed")  # a private copy: its weights are edited
    name = "layers.0.input_layernorm.weight"
    with torch.no_grad():
        base.parameters[name][:4] = 0.0
    base.fingerprint = fingerprint_parameters(base.parameters)
    ft = {n: t.detach().clone() for n, t in base.parameters.items()}
    ft[name][:4] = 0.5
    mask = {name: torch.zeros(base.parameters[name].shape, dtype=torch.bool)}
    mask[name][:4] = True
    spec = tiny_prompt_spec(base)
    revived = build_patch(base.parameters, ft, mask, task="revived", spec=spec, base_fingerprint=base.fingerprint)
    got = mixed_logits(base, revived, tmp_path)
    torch.testing.assert_close(got, Reference(base, revived).logits(TEXTS), rtol=0, atol=1e-5)
