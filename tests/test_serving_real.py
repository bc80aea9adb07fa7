"""The packaged all-MiniLM-L6-v2 through the service: swap bit-exact, mixed within rounding, base intact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.engine.service import TextInput
from app.grafting.base import BaseModel
from app.grafting.patch import patch_to_bytes
from tests.utils.serving import TEXTS, Reference, checksum, make_service
from tests.utils.tiny import make_patch

pytestmark = pytest.mark.slow


def test_real_base_swap_and_mixed_match_the_materialized_graft(real_base: BaseModel, tmp_path: Path) -> None:
    before = checksum(real_base)
    patches = [
        make_patch(real_base, "real-a", "prompt", 1e-3, seed=1),
        make_patch(real_base, "real-b", "classifier", 1e-3, seed=2),
        make_patch(real_base, "real-c", "prompt", 1e-4, seed=3),
    ]
    references = {p.task: Reference(real_base, p).logits(TEXTS) for p in patches}
    inputs = [TextInput(t) for t in TEXTS]
    for policy in ("swap", "mixed"):
        service = make_service(real_base, tmp_path / policy, policy=policy)
        try:
            for patch in patches:
                service.put_patch(patch.task, patch_to_bytes(patch))
            if policy == "swap":
                for patch in patches:
                    rows, _ = service.prepare([patch.task], inputs)
                    assert torch.equal(torch.stack(service.engine.run(rows, timeout=120)), references[patch.task])
            else:
                rows, _ = service.prepare([p.task for p in patches], inputs)
                logits = service.engine.run(rows, timeout=120)
                assert service.engine.stats.mixed_batches == 1
                for i, patch in enumerate(patches):
                    got = torch.stack(logits[i * len(TEXTS) : (i + 1) * len(TEXTS)])
                    torch.testing.assert_close(got, references[patch.task], rtol=1e-5, atol=1e-5)
        finally:
            service.close()
    assert checksum(real_base) == before
