"""Checks that the tokenizer fast path gives the ids the transformers wrapper gives."""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase

from app.grafting.heads import backend_text_ids, text_ids

AWKWARD_TEXTS = (
    "",
    "   ",
    "[MASK] [CLS] <|im_start|> <s> </s> <|endoftext|>",
    "Ünïcödé, emoji 🙂 and CJK 漢字; tabs\tand\nnewlines",
    "a " * 400,  # far past max_length: no truncation here
)


def assert_text_ids_match_the_wrapper(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> None:
    assert tokenizer.is_fast, "a slow tokenizer takes the wrapper itself: nothing to compare"
    # a classifier head's call leaves truncation set on the wrapper's backend: a copy taken now must not inherit it
    # (``text_ids`` may have copied the backend earlier in the session, so a fresh copy is checked too)
    tokenizer("a " * 400, truncation=True, max_length=8)
    fresh, cached = backend_text_ids(tokenizer.backend_tokenizer), text_ids(tokenizer)
    checked = 0
    for text in (*AWKWARD_TEXTS, *texts):
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert fresh(text) == want and cached(text) == want, text
        checked += 1
    assert len(fresh("a " * 400)) > 8 and checked > len(AWKWARD_TEXTS)
