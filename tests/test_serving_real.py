"""The packaged all-MiniLM-L6-v2 through the service: swap bit-exact, mixed within rounding, base intact."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.grafting.base import BaseModel
from tests.utils.serving import assert_swap_and_mixed_match
from tests.utils.tiny import make_patch
from tests.utils.tokens import assert_fast_path_matches_the_wrapper_on_real_text

pytestmark = pytest.mark.slow


def test_real_base_swap_and_mixed_match_the_materialized_graft(real_base: BaseModel, tmp_path: Path) -> None:
    patches = [
        make_patch(real_base, "real-a", "prompt", 1e-3, seed=1),
        make_patch(real_base, "real-b", "classifier", 1e-3, seed=2),
        make_patch(real_base, "real-c", "prompt", 1e-4, seed=3),
    ]
    assert_swap_and_mixed_match(real_base, patches, tmp_path, rtol=1e-5, atol=1e-5)


def test_minilm_fast_token_ids_match_the_wrapper_on_real_text(real_base: BaseModel, data_dir: Path) -> None:
    assert_fast_path_matches_the_wrapper_on_real_text(real_base.tokenizer, data_dir)
