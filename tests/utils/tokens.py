"""Checks that the tokenizer fast path gives the ids the transformers wrapper gives."""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase

from app.grafting.heads import text_ids

AWKWARD_TEXTS = (
    "",
    "   ",
    "[MASK] [CLS] <|im_start|> <s> </s> <|endoftext|>",
    "Ünïcödé, emoji 🙂 and CJK 漢字; tabs\tand\nnewlines",
    "a " * 400,  # far past max_length: no truncation here
)


def assert_text_ids_match_the_wrapper(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> None:
    # a classifier head's call leaves truncation set on the wrapper's backend: the fast path must not inherit it
    tokenizer("a " * 400, truncation=True, max_length=8)
    fast = text_ids(tokenizer)
    checked = 0
    for text in (*AWKWARD_TEXTS, *texts):
        assert fast(text) == tokenizer(text, add_special_tokens=False)["input_ids"], text
        checked += 1
    assert len(fast("a " * 400)) > 8 and checked > len(AWKWARD_TEXTS)
