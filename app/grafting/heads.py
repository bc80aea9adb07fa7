"""Task heads: how a task turns the base's hidden states into label logits.

Two modes (docs/method.md, "Heads"):

* ``prompt``: the input is wrapped in a template; logits are the hidden state at the read position times the
  frozen (tied) embedding rows of the label words. On an encoder the read position is the template's mask token
  (masked-LM); on a decoder it is the last token, and the label word is the next token. No new parameters: all
  skill is in the base.
* ``classifier``: a standard transformers sequence-classification head on the first token (encoders) or the last
  token (decoders). The head tensors are not part of the base, so a patch carries them densely.

``CLASSIFIER_HEADS`` is the one table of classifier kinds (tensor names, shapes, forward) and ``head_logits`` the
one scoring function; validation, initialisation, fine-tuning, localization, evaluation and serving all use them.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import PreTrainedTokenizerBase

HeadMode = Literal["prompt", "classifier"]
ClassifierKind = Literal["bert-pooler", "dense-tanh-out", "linear"]
# How a base reads a task off its hidden states: an encoder at its mask token (prompt) or first token
# (classifier); a decoder at the last token of the input, whose next-token logits name the label.
Family = Literal["encoder", "decoder"]
DECODER_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "olmo", "granite"})


def family_of(model_type: str) -> Family:
    return "decoder" if model_type in DECODER_MODEL_TYPES else "encoder"


ShapeRule = Callable[[int, int], tuple[int, ...]]
_SQUARE: ShapeRule = lambda hidden, labels: (hidden, hidden)  # noqa: E731
_HIDDEN: ShapeRule = lambda hidden, labels: (hidden,)  # noqa: E731
_OUT: ShapeRule = lambda hidden, labels: (labels, hidden)  # noqa: E731
_LABELS: ShapeRule = lambda hidden, labels: (labels,)  # noqa: E731


@dataclass(frozen=True)
class ClassifierHead:
    """One classifier kind: its tensors (transformers' names, after the encoder prefix is stripped) with their
    shapes, and the forward from the pooled hidden vector to logits. The single source for validation,
    initialisation and scoring; a new model family's head is one more entry in ``CLASSIFIER_HEADS``."""

    kind: ClassifierKind
    shapes: tuple[tuple[str, ShapeRule], ...]
    forward: Callable[[torch.Tensor, Mapping[str, torch.Tensor], nn.Module], torch.Tensor]

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.shapes)

    def expected_shapes(self, hidden_size: int, num_labels: int) -> dict[str, tuple[int, ...]]:
        return {name: rule(hidden_size, num_labels) for name, rule in self.shapes}


def _linear(x: torch.Tensor, tensors: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return nn.functional.linear(x, tensors[prefix + ".weight"], tensors[prefix + ".bias"])


CLASSIFIER_HEADS: dict[str, ClassifierHead] = {
    head.kind: head
    for head in (
        # BertForSequenceClassification: pooler (dense + tanh on [CLS]) then a linear classifier
        ClassifierHead(
            "bert-pooler",
            (
                ("pooler.dense.weight", _SQUARE),
                ("pooler.dense.bias", _HIDDEN),
                ("classifier.weight", _OUT),
                ("classifier.bias", _LABELS),
            ),
            lambda x, t, drop: _linear(drop(torch.tanh(_linear(x, t, "pooler.dense"))), t, "classifier"),
        ),
        # RobertaForSequenceClassification / MPNetForSequenceClassification: dense + tanh + out_proj on <s>
        ClassifierHead(
            "dense-tanh-out",
            (
                ("classifier.dense.weight", _SQUARE),
                ("classifier.dense.bias", _HIDDEN),
                ("classifier.out_proj.weight", _OUT),
                ("classifier.out_proj.bias", _LABELS),
            ),
            lambda x, t, drop: _linear(
                drop(torch.tanh(_linear(drop(x), t, "classifier.dense"))), t, "classifier.out_proj"
            ),
        ),
        # a single linear layer on the read position (an encoder's first token, a decoder's last)
        ClassifierHead(
            "linear",
            (("classifier.weight", _OUT), ("classifier.bias", _LABELS)),
            lambda x, t, drop: _linear(drop(x), t, "classifier"),
        ),
    )
}


class HeadError(ValueError):
    """A head specification or head tensors that cannot work with the base."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    text_pair: str | None = None


@dataclass(frozen=True)
class HeadSpec:
    """Everything besides weights that defines a task's output: labels and how logits are read.

    A prompt template holds ``{text}`` (and optionally ``{text_pair}``); for an encoder it also holds ``{mask}``,
    where the label word is predicted; for a decoder the label word follows the template's end (a ``{mask}``, if
    written, must be last). Which of the two applies is checked by ``Tokenization`` against the base.
    """

    mode: HeadMode
    labels: tuple[str, ...]
    template: str | None = None
    label_words: tuple[str, ...] | None = None
    classifier_kind: ClassifierKind | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("prompt", "classifier"):
            raise HeadError(f"head mode must be 'prompt' or 'classifier', got {self.mode!r}")
        if len(self.labels) < 2:
            raise HeadError("a task needs at least two labels")
        if len(set(self.labels)) != len(self.labels):
            raise HeadError(f"labels must be distinct: {list(self.labels)}")
        if self.mode == "prompt":
            if not self.template or "{text}" not in self.template:
                raise HeadError("prompt mode needs a template containing {text} (and {mask} on an encoder base)")
            if not self.label_words or len(self.label_words) != len(self.labels):
                raise HeadError(
                    f"prompt mode needs one label word per label ({len(self.labels)}), "
                    f"got {list(self.label_words or [])}"
                )
        elif self.classifier_kind is not None and self.classifier_kind not in CLASSIFIER_HEADS:
            raise HeadError(f"unknown classifier kind {self.classifier_kind!r}; known: {sorted(CLASSIFIER_HEADS)}")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}

    @classmethod
    def from_json(cls, data: dict[str, object] | str) -> HeadSpec:
        raw = json.loads(data) if isinstance(data, str) else dict(data)
        words = raw.get("label_words")
        return cls(
            mode=raw["mode"],  # type: ignore[arg-type]
            labels=tuple(raw["labels"]),  # type: ignore[arg-type]
            template=raw.get("template"),  # type: ignore[arg-type]
            label_words=tuple(words) if words else None,  # type: ignore[arg-type]
            classifier_kind=raw.get("classifier_kind"),  # type: ignore[arg-type]
        )


def default_classifier_kind(model_type: str) -> ClassifierKind:
    if family_of(model_type) == "decoder":
        return "linear"
    return "bert-pooler" if model_type == "bert" else "dense-tanh-out"


def detect_classifier_kind(names: Sequence[str]) -> ClassifierKind | None:
    """The classifier kind whose tensors a checkpoint holds, most specific first."""
    present = set(names)
    for kind in ("bert-pooler", "dense-tanh-out", "linear"):
        if all(name in present for name in CLASSIFIER_HEADS[kind].tensor_names):
            return kind  # type: ignore[return-value]
    return None


def label_word_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str], family: Family = "encoder") -> list[int]:
    """Vocabulary id of each label word, as the base predicts it.

    Encoder: each word must be one token (tried with and without a leading space). Decoder: the first token of
    the word as it follows the template, i.e. with a leading space unless the word brings its own whitespace
    (BPE vocabularies spell " positive" and "positive" differently). Words that map to the same id are refused.
    """
    ids: list[int] = []
    for word in words:
        found = None
        if family == "decoder":
            spelled = word if word[:1].isspace() else " " + word
            pieces = tokenizer(spelled, add_special_tokens=False)["input_ids"]
            found = pieces[0] if pieces else None
        else:
            for candidate in (" " + word, word):
                pieces = tokenizer(candidate, add_special_tokens=False)["input_ids"]
                if len(pieces) == 1:
                    found = pieces[0]
                    break
        if found is None or (tokenizer.unk_token_id is not None and found == tokenizer.unk_token_id):
            kind = "has no token" if family == "decoder" else "is not a single token"
            raise HeadError(f"label word {word!r} {kind} of the base vocabulary")
        ids.append(int(found))
    if len(set(ids)) != len(ids):
        clashes = [w for w, i in zip(words, ids, strict=True) if ids.count(i) > 1]
        raise HeadError(f"label words {clashes} start with the same token of the base vocabulary; choose others")
    return ids


@dataclass
class Encoded:
    """Token ids of one example, ready to pad into a batch."""

    input_ids: list[int]
    token_type_ids: list[int]
    # where the head reads the hidden state: the mask token, the first token or (decoders) the last token
    read_position: int = 0
    # True when the text did not fit in max_length tokens and its end was cut off
    truncated: bool = False


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None
    read_positions: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        types = None if self.token_type_ids is None else self.token_type_ids.to(device)
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), types, self.read_positions.to(device))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


TextIds = Callable[[str], list[int]]


class FastTokenizer:
    """Private copies of a fast tokenizer's Rust backend, called directly.

    Directly: a sentence costs ~50 us instead of ~120 us through the transformers wrapper (measured on both
    packaged bases), time that holds the GIL the inference thread needs. Private: the wrapper sets truncation on
    the backend it shares before each call (and resets it after none), so threads calling it at once can see
    each other's settings; each copy here has its truncation fixed once, as the wrapper would set it."""

    def __init__(self, backend: Any, truncation_side: str = "right") -> None:
        self._json = backend.to_str()
        self._truncation_side = truncation_side
        self._lock = threading.Lock()
        self.plain = self._copy(None)
        self._truncating: dict[int, Any] = {}

    def _copy(self, max_length: int | None) -> Any:
        copy = Tokenizer.from_str(self._json)
        copy.no_padding()
        if max_length is None:
            copy.no_truncation()
        else:
            copy.enable_truncation(max_length, stride=0, strategy="longest_first", direction=self._truncation_side)
        return copy

    def text_ids(self, text: str) -> list[int]:
        """As ``tokenizer(text, add_special_tokens=False)["input_ids"]``."""
        return list(self.plain.encode(text, add_special_tokens=False).ids)

    def encode(self, text: str, pair: str | None, max_length: int | None) -> Any:
        """As ``tokenizer(text, pair, truncation=max_length is not None, max_length=max_length)``: an Encoding."""
        if max_length is None:
            return self.plain.encode(text, pair, add_special_tokens=True)
        with self._lock:
            truncating = self._truncating.get(max_length)
            if truncating is None:
                truncating = self._truncating[max_length] = self._copy(max_length)
        return truncating.encode(text, pair, add_special_tokens=True)


_FAST: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, FastTokenizer] = weakref.WeakKeyDictionary()
_FAST_LOCK = threading.Lock()


def fast_tokenizer(tokenizer: PreTrainedTokenizerBase) -> FastTokenizer | None:
    """The tokenizer's ``FastTokenizer``, made once per tokenizer; None for a slow (pure Python) tokenizer."""
    backend: Any = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    with _FAST_LOCK:
        fast = _FAST.get(tokenizer)
        if fast is None:
            fast = _FAST[tokenizer] = FastTokenizer(backend, getattr(tokenizer, "truncation_side", "right"))
        return fast


def text_ids(tokenizer: PreTrainedTokenizerBase) -> TextIds:
    """Text to token ids without special tokens, as ``tokenizer(text, add_special_tokens=False)["input_ids"]``."""
    fast = fast_tokenizer(tokenizer)
    if fast is None:
        return lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return fast.text_ids


class Tokenization:
    """Turns examples into token ids for one head spec on one base family; the engine calls it outside the weight
    lock. ``family`` defaults to what the tokenizer implies: one with a mask token serves an encoder."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        spec: HeadSpec,
        max_length: int = 128,
        family: Family | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        self.family: Family = family or ("encoder" if tokenizer.mask_token_id is not None else "decoder")
        self.max_length = min(max_length, int(getattr(tokenizer, "model_max_length", max_length) or max_length))
        self.uses_token_types = "token_type_ids" in tokenizer.model_input_names
        self._fast = fast_tokenizer(tokenizer)
        # special tokens a plain call adds around a text ([CLS] … [SEP], <s> … </s>, or a decoder's BOS if any)
        self._prefix, self._suffix = _special_affixes(tokenizer)
        if spec.mode == "prompt":
            template = spec.template or ""
            if self.family == "encoder":
                if tokenizer.mask_token_id is None:
                    raise HeadError("prompt mode on an encoder needs a tokenizer with a mask token")
                if "{mask}" not in template:
                    raise HeadError("prompt mode on an encoder base needs {mask} in the template")
            elif "{mask}" in template and not template.rstrip().endswith("{mask}"):
                raise HeadError("on a decoder base the label word follows the template: {mask} may only be last")
            self._segments = _split_template(template)
            if self.family == "decoder":
                self._segments = [(kind, text) for kind, text in self._segments if kind != "mask"]
                # the label word brings its own leading space (" positive"): a space before a trailing {mask}
                # would be tokenized twice
                if self._segments and self._segments[-1][0] == "literal":
                    self._segments[-1] = ("literal", self._segments[-1][1].rstrip(" "))
            self._text_ids = text_ids(tokenizer)
            # the template's literal pieces are the same for every example: tokenized once
            self._literal_ids = {text: self._text_ids(text) for kind, text in self._segments if kind == "literal"}

    def encode(self, example: Example) -> Encoded:
        if self.spec.mode == "classifier":
            fast = self._fast
            if fast is None:
                enc = self.tokenizer(example.text, example.text_pair, truncation=True, max_length=self.max_length)
                ids = list(enc["input_ids"])
                types = list(enc.get("token_type_ids") or [0] * len(ids))
            else:
                encoding = fast.encode(example.text, example.text_pair, self.max_length)
                ids = list(encoding.ids)
                # the wrapper returns token types only to a model that takes them
                types = list(encoding.type_ids) if self.uses_token_types else [0] * len(ids)
            truncated = len(ids) >= self.max_length and self._longer_than_limit(example)
            position = len(ids) - 1 if self.family == "decoder" else 0
            return Encoded(ids, types, position, truncated)
        return self._encode_prompt(example)

    def _longer_than_limit(self, example: Example) -> bool:
        if self._fast is None:
            full = self.tokenizer(example.text, example.text_pair, truncation=False)["input_ids"]
        else:
            full = self._fast.encode(example.text, example.text_pair, None).ids
        return len(full) > self.max_length

    def _encode_prompt(self, example: Example) -> Encoded:
        tok = self.tokenizer
        pieces: list[tuple[str, list[int]]] = []
        for kind, literal in self._segments:
            if kind == "literal":
                pieces.append(("literal", self._literal_ids[literal]))
            elif kind == "mask":
                pieces.append(("mask", [tok.mask_token_id]))
            elif kind == "text":
                pieces.append(("text", self._text_ids(example.text)))
            else:
                pieces.append(("text", self._text_ids(example.text_pair or "")))
        budget = self.max_length - len(self._prefix) - len(self._suffix)
        # Truncate the longest text piece first, never the template or the mask.
        truncated = sum(len(ids) for _, ids in pieces) > budget
        while sum(len(ids) for _, ids in pieces) > budget:
            longest = max((i for i, (k, _) in enumerate(pieces) if k == "text"), key=lambda i: len(pieces[i][1]))
            if not pieces[longest][1]:
                raise HeadError(
                    f"the template alone is longer than the maximum sequence length ({self.max_length} tokens)"
                )
            pieces[longest] = ("text", pieces[longest][1][:-1])
        body = [token for _, ids in pieces for token in ids]
        if self.family == "decoder":
            # the next token after the template is the label word: read the last position, no suffix after it
            input_ids = [*self._prefix, *body]
            return Encoded(input_ids, [0] * len(input_ids), len(input_ids) - 1, truncated)
        input_ids = [*self._prefix, *body, *self._suffix]
        return Encoded(input_ids, [0] * len(input_ids), input_ids.index(tok.mask_token_id), truncated)

    def encode_many(self, examples: Sequence[Example]) -> list[Encoded]:
        return [self.encode(example) for example in examples]

    def collate(self, encoded: Sequence[Encoded]) -> Batch:
        return collate(encoded, int(self.tokenizer.pad_token_id or 0), self.uses_token_types)


def _special_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Special token ids a tokenizer puts before and after a single text."""
    marker = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(marker) + 1):
        if full[start : start + len(marker)] == marker:
            return list(full[:start]), list(full[start + len(marker) :])
    return [], []


def collate(encoded: Sequence[Encoded], pad_id: int, uses_token_types: bool) -> Batch:
    """Right-pad a list of encoded examples into one batch. Right padding suits decoders too: causal attention
    keeps the pads after a row's read position out of its hidden state, and position ids stay 0..n−1."""
    width = max(len(item.input_ids) for item in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    types = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, item in enumerate(encoded):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        attention[row, :n] = 1
        types[row, :n] = torch.tensor(item.token_type_ids)
    positions = torch.tensor([item.read_position for item in encoded])
    return Batch(ids, attention, types if uses_token_types else None, positions)


def _split_template(template: str) -> list[tuple[str, str]]:
    segments: list[tuple[str, str]] = []
    rest = template
    markers = {"{text}": "text", "{text_pair}": "text_pair", "{mask}": "mask"}
    while rest:
        hits = [(rest.find(marker), marker) for marker in markers if marker in rest]
        if not hits:
            segments.append(("literal", rest))
            break
        position, marker = min(hits)
        if position:
            segments.append(("literal", rest[:position]))
        segments.append((markers[marker], ""))
        rest = rest[position + len(marker) :]
    return [(kind, text) for kind, text in segments if kind != "literal" or text.strip()]


def encoder_hidden(encoder: nn.Module, batch: Batch) -> torch.Tensor:
    """Last hidden states of the base body (an encoder, or a decoder without its LM head)."""
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if batch.token_type_ids is not None:
        kwargs["token_type_ids"] = batch.token_type_ids
    return encoder(**kwargs).last_hidden_state


def head_logits(
    spec: HeadSpec,
    hidden: torch.Tensor,
    read_positions: torch.Tensor,
    *,
    label_embeddings: torch.Tensor | None = None,
    head_tensors: Mapping[str, torch.Tensor] | None = None,
    dropout: nn.Module | None = None,
) -> torch.Tensor:
    """The one scoring function (engine, fine-tuning, localization, evaluation): label logits from hidden states.

    Prompt mode: the hidden state at the read position times the label words' rows of the (tied) embedding
    table, which is the masked-LM / next-token logit of each label word. Classifier mode: the kind's forward on
    the hidden state at the read position.
    """
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    pooled = hidden[rows, read_positions]
    if spec.mode == "prompt":
        assert label_embeddings is not None, "prompt mode scores with the label words' embeddings"
        return pooled @ label_embeddings.T
    assert spec.classifier_kind is not None and head_tensors is not None, "classifier mode needs its head tensors"
    return CLASSIFIER_HEADS[spec.classifier_kind].forward(pooled, head_tensors, dropout or nn.Identity())


def validate_head_tensors(spec: HeadSpec, tensors: Mapping[str, torch.Tensor], hidden_size: int) -> None:
    """Refuse head tensors that are missing, of the wrong shape or non-finite, naming the tensor."""
    if spec.mode == "prompt":
        if tensors:
            raise HeadError(f"prompt mode takes no head tensors, got {sorted(tensors)[:3]}")
        return
    kind = spec.classifier_kind
    if kind is None:
        raise HeadError("classifier mode needs a classifier kind")
    expected = CLASSIFIER_HEADS[kind].expected_shapes(hidden_size, spec.num_labels)
    for name, shape in expected.items():
        if name not in tensors:
            raise HeadError(f"classifier head tensor {name!r} is missing")
        if tuple(tensors[name].shape) != shape:
            raise HeadError(f"head tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")
        if not tensors[name].is_floating_point():
            raise HeadError(f"head tensor {name!r} has dtype {tensors[name].dtype}, expected a float dtype")
        if not torch.isfinite(tensors[name]).all():
            raise HeadError(f"head tensor {name!r} holds NaN or Inf values")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise HeadError(f"unexpected head tensors for kind {kind}: {unexpected[:3]}")


class TaskModel(nn.Module):
    """The shared base body plus one task's head: the single forward used by fine-tuning, localization and
    evaluation (the engine scores with the same ``head_logits``).

    The body is referenced, not copied; head tensors (classifier mode) are this module's own parameters.
    """

    def __init__(
        self,
        encoder: nn.Module,
        spec: HeadSpec,
        tokenizer: PreTrainedTokenizerBase,
        head_tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.spec = spec
        self.family = family_of(str(getattr(encoder.config, "model_type", "")))
        self.head = nn.ParameterDict()
        default_dropout = 0.1 if self.family == "encoder" else 0.0
        self.dropout = nn.Dropout(float(getattr(encoder.config, "hidden_dropout_prob", default_dropout) or 0.0))
        if spec.mode == "prompt":
            self.label_ids = label_word_ids(tokenizer, spec.label_words or (), self.family)
        else:
            tensors = dict(head_tensors or {})
            validate_head_tensors(spec, tensors, int(encoder.config.hidden_size))
            for name, tensor in tensors.items():
                self.head[name.replace(".", "__")] = nn.Parameter(tensor.detach().clone(), requires_grad=False)
        # Mirror the shared encoder's mode: wrapping an eval-mode base must not switch it (and its dropout) on
        # when a caller later restores "the model's" mode.
        self.train(encoder.training)

    def head_tensors(self) -> dict[str, torch.Tensor]:
        return {key.replace("__", "."): value for key, value in self.head.items()}

    def logits_from_hidden(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        label_embeddings = None
        if self.spec.mode == "prompt":
            table = self.encoder.get_input_embeddings().weight
            label_embeddings = table[torch.tensor(self.label_ids, device=table.device)]
        return head_logits(
            self.spec,
            hidden,
            batch.read_positions,
            label_embeddings=label_embeddings,
            head_tensors=self.head_tensors(),
            dropout=self.dropout,
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.logits_from_hidden(encoder_hidden(self.encoder, batch), batch)


def init_classifier_head(
    kind: ClassifierKind, num_labels: int, hidden_size: int, base_extra: Mapping[str, torch.Tensor], seed: int
) -> dict[str, torch.Tensor]:
    """Fresh head tensors: any the base folder ships (BERT's pooler) are reused, the rest drawn N(0, 0.02)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in CLASSIFIER_HEADS[kind].expected_shapes(hidden_size, num_labels).items():
        if name in base_extra and tuple(base_extra[name].shape) == shape:
            tensors[name] = base_extra[name].detach().clone().float()
        elif name.endswith("bias"):
            tensors[name] = torch.zeros(shape)
        else:
            tensors[name] = torch.randn(shape, generator=generator) * 0.02
    return tensors
