"""The packaged default base, SmolLM2-135M-Instruct (a decoder LM from a GGUF file), end to end: load and
fingerprint, swap bit-exact, mixed within rounding, base intact, and one upload → job → classify."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.core.store import LocalTaskStore
from app.engine.service import TextInput
from app.grafting.base import BaseModel, EligibleRule, eligible_size, load_base
from app.grafting.checkpoint import save_checkpoint
from app.grafting.heads import HeadSpec
from app.jobs.models import JobState, TaskSpec
from app.jobs.service import build_job_service
from tests.utils.serving import TEXTS, Reference, assert_swap_and_mixed_match, make_service
from tests.utils.tiny import make_patch, random_finetune
from tests.utils.tokens import assert_fast_path_matches_the_wrapper_on_real_text
from tests.utils.uploads import jsonl, stage

pytestmark = pytest.mark.slow

SENTIMENT = HeadSpec("prompt", ("neg", "pos"), "Review: {text}\nSentiment:", ("negative", "positive"))


@pytest.fixture(scope="module")
def smollm2() -> BaseModel:
    return load_base("smollm2-135m-instruct")


def test_the_default_base_is_smollm2_loaded_from_its_cache(smollm2: BaseModel) -> None:
    assert smollm2.family == "decoder" and smollm2.model_type == "llama" and smollm2.name == "SmolLM2-135M-Instruct"
    assert smollm2.num_parameters == 134_515_008  # the tied LM head is the embedding table, counted once
    assert eligible_size(smollm2.parameters, EligibleRule()) == 106_202_880
    assert smollm2.hidden_size == 576 and len([n for n in smollm2.parameters if n.endswith("q_proj.weight")]) == 30
    # the converted float32 cache gives the same weights every time
    assert load_base().fingerprint == smollm2.fingerprint


def test_smollm2_swap_and_mixed_match_the_materialized_graft(smollm2: BaseModel, tmp_path: Path) -> None:
    patches = [make_patch(smollm2, "smol-a", "prompt", 1e-4, seed=1), make_patch(smollm2, "smol-c", "classifier", 1e-4)]
    # logits of magnitude ~20 after 30 float32 layers: a few ulps of rounding, relative
    assert_swap_and_mixed_match(smollm2, patches, tmp_path, rtol=1e-6, atol=1e-5)


def test_smollm2_upload_job_and_classify(smollm2: BaseModel, tmp_path: Path) -> None:
    """A fine-tuned LlamaForCausalLM checkpoint (safetensors, ``model.`` keys) → an in-process job → a servable
    task whose predictions equal the materialized graft's."""
    body = random_finetune(smollm2, seed=4, scale=0.01)
    folder = save_checkpoint(tmp_path / "ckpt", smollm2, body, SENTIMENT)
    settings = Settings(store_dir=tmp_path / "store", base_model="smollm2-135m-instruct")
    store = LocalTaskStore(settings.store_dir)
    jobs = build_job_service(settings, smollm2, store)
    try:
        staging = stage(jobs, folder / "model.safetensors", jsonl(16), jsonl(8))
        spec = TaskSpec(
            task="smol-sst2",
            mode="prompt",
            template=SENTIMENT.template,
            label_words=list(SENTIMENT.label_words or ()),
            method="topk",
            sparsity=1e-4,
            steps=0,
        )
        record, created = jobs.submit(staging, spec)
        assert created
        deadline = time.monotonic() + 600
        while not (done := jobs.get(record.id)).state.finished and time.monotonic() < deadline:
            time.sleep(0.5)
        assert done.state == JobState.succeeded, done.error
        assert done.result is not None and done.result["mask_size"] == 10_620
    finally:
        jobs.runner.close()
    service = make_service(smollm2, settings.store_dir)
    try:
        rows, _ = service.prepare(["smol-sst2"], [TextInput(t) for t in TEXTS])
        got = torch.stack(service.engine.run(rows, timeout=300))
        patch = service.registry.get("smol-sst2")
        assert patch.spec == HeadSpec("prompt", ("neg", "pos"), SENTIMENT.template, SENTIMENT.label_words)
        from app.grafting.patch import load_patch

        want = Reference(smollm2, load_patch(store.patch_path("smol-sst2"))).logits(TEXTS)
        assert torch.equal(got, want)
    finally:
        service.close()


def test_smollm2_fast_token_ids_match_the_wrapper_on_real_text(smollm2: BaseModel, data_dir: Path) -> None:
    assert_fast_path_matches_the_wrapper_on_real_text(smollm2.tokenizer, data_dir)
