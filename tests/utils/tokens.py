"""Checks that the tokenizer fast path gives what the transformers wrapper gives."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from app.grafting.data import load_dataset
from app.grafting.heads import Example, FastTokenizer, HeadSpec, Tokenization, text_ids

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
    fresh, cached = FastTokenizer(tokenizer.backend_tokenizer).text_ids, text_ids(tokenizer)
    checked = 0
    for text in (*AWKWARD_TEXTS, *texts):
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert fresh(text) == want and cached(text) == want, text
        checked += 1
    assert len(fresh("a " * 400)) > 8 and checked > len(AWKWARD_TEXTS)


def assert_classifier_encoding_matches_the_wrapper(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str | None]]
) -> None:
    """A classifier head's ids, token types, read position and truncation flag, at a limit most pairs pass and
    at one few fit, as the wrapper's ``truncation=True`` call gives them."""
    assert tokenizer.is_fast
    spec = HeadSpec("classifier", ("a", "b"))
    cases = [*pairs, *((text, None) for text in AWKWARD_TEXTS), ("a " * 300, "b " * 200)]
    cut = 0
    for max_length in (16, 128):
        tokenization = Tokenization(tokenizer, spec, max_length)
        for text, pair in cases:
            got = tokenization.encode(Example(text, -1, pair))
            want = tokenizer(text, pair, truncation=True, max_length=max_length)
            ids = list(want["input_ids"])
            types = list(want.get("token_type_ids") or [0] * len(ids))
            longer = len(tokenizer(text, pair)["input_ids"]) > max_length
            assert (got.input_ids, got.token_type_ids, got.truncated) == (ids, types, longer), (text, pair)
            assert got.read_position == (len(ids) - 1 if tokenization.family == "decoder" else 0)
            cut += longer
    assert cut > 0  # the short limit did truncate


def assert_fast_path_matches_the_wrapper_on_real_text(tokenizer: PreTrainedTokenizerBase, data_dir: Path) -> None:
    """Both checks above on SST-2 dev sentences and RTE train pairs."""
    sst2, rte = load_dataset("sst2", data_dir), load_dataset("rte", data_dir)
    texts = [e.text for e in sst2.dev] + [t for e in rte.train[:500] for t in (e.text, e.text_pair or "")]
    assert_text_ids_match_the_wrapper(tokenizer, texts)
    pairs = [(e.text, None) for e in sst2.dev[:300]] + [(e.text, e.text_pair) for e in rte.train[:300]]
    assert_classifier_encoding_matches_the_wrapper(tokenizer, pairs)
