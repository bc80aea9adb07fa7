"""Helpers for serving tests: offline references (the materialized graft), checksums, a service factory."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

from app.engine.engine import EngineConfig
from app.engine.service import InferenceService, ServiceLimits
from app.grafting.base import BaseModel, fingerprint_parameters
from app.grafting.heads import Encoded, Example, TaskModel, Tokenization
from app.grafting.patch import GraftPatch, materialize

TEXTS = (
    "a gripping, beautiful film",
    "dull, far too long and badly acted",
    "it was fine",
    "the best thing I have seen this year, truly wonderful from start to end",
    "no",
    "an utter waste of two hours",
    "surprisingly moving",
    "I would not watch it again, but the music was great and the cast did their best with a thin script",
)


class Reference:
    """The offline graft θ_pre + γ⊙δ of one patch as its own full model: what the server must reproduce."""

    def __init__(self, base: BaseModel, patch: GraftPatch, max_length: int = 128) -> None:
        encoder = copy.deepcopy(base.encoder)
        state = materialize(base.parameters, patch)
        own = dict(encoder.named_parameters())
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(state[name])
        self.model = TaskModel(encoder, patch.spec, base.tokenizer, patch.head or None).eval()
        self.tokenization = Tokenization(base.tokenizer, patch.spec, max_length, base.family)

    def encode(self, texts: Sequence[str | tuple[str, str]]) -> list[Encoded]:
        examples = [Example(t, -1) if isinstance(t, str) else Example(t[0], -1, t[1]) for t in texts]
        return self.tokenization.encode_many(examples)

    @torch.inference_mode()
    def logits(self, texts: Sequence[str | tuple[str, str]]) -> torch.Tensor:
        """Logits of ``texts`` run as one batch, in order (the batch the engine runs for one request)."""
        return self.model(self.tokenization.collate(self.encode(texts))).float()

    def probabilities(self, text: str | tuple[str, str]) -> list[float]:
        return torch.softmax(self.logits([text])[0].double(), dim=-1).tolist()


def checksum(base: BaseModel) -> str:
    return fingerprint_parameters(base.parameters)


def make_service(base: BaseModel, store_dir: Path, cache_bytes: int = 64 * 2**20, **engine: object) -> InferenceService:
    # without the compiled kernel unless a test asks for it: a build would cost a minute of CPU in the background
    defaults = {"max_batch_size": 64, "max_batch_wait_ms": 2.0, "mixed_kernel": False}
    config = EngineConfig(**{**defaults, **engine})  # type: ignore[arg-type]
    return InferenceService.for_directory(base, store_dir, ServiceLimits(), config, cache_bytes, 128)


def assert_swap_and_mixed_match(
    base: BaseModel, patches: Sequence[GraftPatch], store_dir: Path, rtol: float, atol: float, timeout: float = 300
) -> None:
    """Through the service: each patch swapped in alone gives the materialized graft's logits bit for bit; all
    of them in one mixed batch give them within (rtol, atol); and the base comes back unchanged."""
    from app.engine.service import TextInput
    from app.grafting.patch import patch_to_bytes

    before = checksum(base)
    references = {p.task: Reference(base, p).logits(TEXTS) for p in patches}
    inputs = [TextInput(t) for t in TEXTS]
    for policy in ("swap", "mixed"):
        service = make_service(base, store_dir / policy, policy=policy)
        try:
            for patch in patches:
                service.put_patch(patch.task, patch_to_bytes(patch))
            if policy == "swap":
                for patch in patches:
                    rows, _ = service.prepare([patch.task], inputs)
                    assert torch.equal(torch.stack(service.engine.run(rows, timeout=timeout)), references[patch.task])
            else:
                rows, _ = service.prepare([p.task for p in patches], inputs)
                logits = service.engine.run(rows, timeout=timeout)
                assert service.engine.stats.mixed_batches == 1
                for i, patch in enumerate(patches):
                    got = torch.stack(logits[i * len(TEXTS) : (i + 1) * len(TEXTS)])
                    torch.testing.assert_close(got, references[patch.task], rtol=rtol, atol=atol)
        finally:
            service.close()
    assert checksum(base) == before
