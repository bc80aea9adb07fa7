"""Task heads: how a task turns encoder hidden states into label logits.

Two modes (PAPER.md, "Adapting it"):

* ``prompt``: the input is wrapped in a template holding the mask token; logits are the hidden state at the mask
  position times the frozen word-embedding rows of the label words. No new parameters: all skill is in the encoder.
* ``classifier``: a standard transformers sequence-classification head. The head tensors (e.g. BERT's pooler and
  classifier) are not part of the base encoder, so a patch carries them densely.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

HeadMode = Literal["prompt", "classifier"]
ClassifierKind = Literal["bert-pooler", "dense-tanh-out", "linear"]

# Tensor names each classifier kind needs, with transformers' own naming (after stripping the encoder prefix).
CLASSIFIER_TENSORS: dict[str, tuple[str, ...]] = {
    # BertForSequenceClassification: pooler (dense + tanh on [CLS]) then a linear classifier
    "bert-pooler": ("pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias"),
    # RobertaForSequenceClassification / MPNetForSequenceClassification: dense + tanh + out_proj on <s>
    "dense-tanh-out": (
        "classifier.dense.weight",
        "classifier.dense.bias",
        "classifier.out_proj.weight",
        "classifier.out_proj.bias",
    ),
    # a single linear layer on the first token
    "linear": ("classifier.weight", "classifier.bias"),
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
    """Everything besides weights that defines a task's output: labels and how logits are read."""

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
            if not self.template or "{mask}" not in self.template or "{text}" not in self.template:
                raise HeadError("prompt mode needs a template containing {text} and {mask}")
            if not self.label_words or len(self.label_words) != len(self.labels):
                raise HeadError(
                    f"prompt mode needs one label word per label ({len(self.labels)}), "
                    f"got {list(self.label_words or [])}"
                )
        elif self.classifier_kind is not None and self.classifier_kind not in CLASSIFIER_TENSORS:
            raise HeadError(f"unknown classifier kind {self.classifier_kind!r}; known: {sorted(CLASSIFIER_TENSORS)}")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def uses_pair(self) -> bool:
        return self.template is not None and "{text_pair}" in self.template

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
    return "bert-pooler" if model_type == "bert" else "dense-tanh-out"


def detect_classifier_kind(names: Sequence[str]) -> ClassifierKind | None:
    """The classifier kind whose tensors a checkpoint holds, most specific first."""
    present = set(names)
    for kind in ("bert-pooler", "dense-tanh-out", "linear"):
        if all(name in present for name in CLASSIFIER_TENSORS[kind]):
            return kind  # type: ignore[return-value]
    return None


def label_word_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[int]:
    """Vocabulary id of each label word; each word must be one token (tried with and without a leading space)."""
    ids: list[int] = []
    for word in words:
        found = None
        for candidate in (" " + word, word):
            pieces = tokenizer(candidate, add_special_tokens=False)["input_ids"]
            if len(pieces) == 1:
                found = pieces[0]
                break
        if found is None or found == tokenizer.unk_token_id:
            raise HeadError(f"label word {word!r} is not a single token of the base vocabulary")
        ids.append(int(found))
    if len(set(ids)) != len(ids):
        raise HeadError(f"label words map to repeated tokens: {list(words)}")
    return ids


@dataclass
class Encoded:
    """Token ids of one example, ready to pad into a batch."""

    input_ids: list[int]
    token_type_ids: list[int]
    mask_position: int = -1
    # True when the text did not fit in max_length tokens and its end was cut off
    truncated: bool = False


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None
    mask_positions: torch.Tensor | None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            move(self.token_type_ids),
            move(self.mask_positions),
        )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class Tokenization:
    """Turns examples into token ids for one head spec; the engine calls it outside the weight lock."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, spec: HeadSpec, max_length: int = 128) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        self.max_length = min(max_length, int(getattr(tokenizer, "model_max_length", max_length) or max_length))
        self.uses_token_types = "token_type_ids" in tokenizer.model_input_names
        if spec.mode == "prompt":
            if tokenizer.mask_token_id is None:
                raise HeadError("prompt mode needs a tokenizer with a mask token")
            self._segments = _split_template(spec.template or "")

    def encode(self, example: Example) -> Encoded:
        if self.spec.mode == "classifier":
            enc = self.tokenizer(
                example.text,
                example.text_pair,
                truncation=True,
                max_length=self.max_length,
            )
            types = enc.get("token_type_ids") or [0] * len(enc["input_ids"])
            truncated = len(enc["input_ids"]) >= self.max_length and self._longer_than_limit(example)
            return Encoded(list(enc["input_ids"]), list(types), truncated=truncated)
        return self._encode_prompt(example)

    def _longer_than_limit(self, example: Example) -> bool:
        full = self.tokenizer(example.text, example.text_pair, truncation=False)["input_ids"]
        return len(full) > self.max_length

    def _encode_prompt(self, example: Example) -> Encoded:
        tok = self.tokenizer
        pieces: list[tuple[str, list[int]]] = []
        for kind, literal in self._segments:
            if kind == "literal":
                pieces.append(("literal", tok(literal, add_special_tokens=False)["input_ids"]))
            elif kind == "mask":
                pieces.append(("mask", [tok.mask_token_id]))
            elif kind == "text":
                pieces.append(("text", tok(example.text, add_special_tokens=False)["input_ids"]))
            else:
                pieces.append(("text", tok(example.text_pair or "", add_special_tokens=False)["input_ids"]))
        budget = self.max_length - 2  # [CLS] ... [SEP] (RoBERTa: <s> ... </s>)
        # Truncate the longest text piece first, never the template or the mask.
        truncated = sum(len(ids) for _, ids in pieces) > budget
        while sum(len(ids) for _, ids in pieces) > budget:
            longest = max((i for i, (k, _) in enumerate(pieces) if k == "text"), key=lambda i: len(pieces[i][1]))
            if not pieces[longest][1]:
                raise HeadError("the template alone is longer than the maximum sequence length")
            pieces[longest] = ("text", pieces[longest][1][:-1])
        body = [token for _, ids in pieces for token in ids]
        input_ids = [tok.cls_token_id, *body, tok.sep_token_id]
        mask_position = input_ids.index(tok.mask_token_id)
        return Encoded(input_ids, [0] * len(input_ids), mask_position, truncated)

    def encode_many(self, examples: Sequence[Example]) -> list[Encoded]:
        return [self.encode(example) for example in examples]

    def collate(self, encoded: Sequence[Encoded]) -> Batch:
        return collate(encoded, int(self.tokenizer.pad_token_id or 0), self.uses_token_types, self.spec.mode)


def collate(encoded: Sequence[Encoded], pad_id: int, uses_token_types: bool, mode: str) -> Batch:
    """Right-pad a list of encoded examples into one batch."""
    width = max(len(item.input_ids) for item in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    types = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, item in enumerate(encoded):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        attention[row, :n] = 1
        types[row, :n] = torch.tensor(item.token_type_ids)
    positions = torch.tensor([item.mask_position for item in encoded]) if mode == "prompt" else None
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
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if batch.token_type_ids is not None:
        kwargs["token_type_ids"] = batch.token_type_ids
    return encoder(**kwargs).last_hidden_state


def prompt_logits(hidden: torch.Tensor, mask_positions: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, mask_positions] @ label_embeddings.T


def classifier_logits(
    hidden: torch.Tensor, kind: ClassifierKind, tensors: dict[str, torch.Tensor], dropout: nn.Module | None = None
) -> torch.Tensor:
    first = hidden[:, 0]
    drop = dropout if dropout is not None else nn.Identity()
    if kind == "bert-pooler":
        pooled = torch.tanh(nn.functional.linear(first, tensors["pooler.dense.weight"], tensors["pooler.dense.bias"]))
        return nn.functional.linear(drop(pooled), tensors["classifier.weight"], tensors["classifier.bias"])
    if kind == "dense-tanh-out":
        x = torch.tanh(
            nn.functional.linear(drop(first), tensors["classifier.dense.weight"], tensors["classifier.dense.bias"])
        )
        return nn.functional.linear(drop(x), tensors["classifier.out_proj.weight"], tensors["classifier.out_proj.bias"])
    return nn.functional.linear(drop(first), tensors["classifier.weight"], tensors["classifier.bias"])


def validate_head_tensors(spec: HeadSpec, tensors: dict[str, torch.Tensor], hidden_size: int) -> None:
    """Refuse head tensors that are missing, of the wrong shape or non-finite, naming the tensor."""
    if spec.mode == "prompt":
        if tensors:
            raise HeadError(f"prompt mode takes no head tensors, got {sorted(tensors)[:3]}")
        return
    kind = spec.classifier_kind
    if kind is None:
        raise HeadError("classifier mode needs a classifier kind")
    n = spec.num_labels
    expected = {
        "bert-pooler": {
            "pooler.dense.weight": (hidden_size, hidden_size),
            "pooler.dense.bias": (hidden_size,),
            "classifier.weight": (n, hidden_size),
            "classifier.bias": (n,),
        },
        "dense-tanh-out": {
            "classifier.dense.weight": (hidden_size, hidden_size),
            "classifier.dense.bias": (hidden_size,),
            "classifier.out_proj.weight": (n, hidden_size),
            "classifier.out_proj.bias": (n,),
        },
        "linear": {"classifier.weight": (n, hidden_size), "classifier.bias": (n,)},
    }[kind]
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
    """The shared encoder plus one task's head: the single forward used by fine-tuning, localization and serving.

    The encoder is referenced, not copied; head tensors (classifier mode) are this module's own parameters.
    """

    def __init__(
        self,
        encoder: nn.Module,
        spec: HeadSpec,
        tokenizer: PreTrainedTokenizerBase,
        head_tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.spec = spec
        self.head = nn.ParameterDict()
        hidden_dropout = float(getattr(encoder.config, "hidden_dropout_prob", 0.1) or 0.0)
        self.dropout = nn.Dropout(hidden_dropout)
        if spec.mode == "prompt":
            self.label_ids = label_word_ids(tokenizer, spec.label_words or ())
        else:
            tensors = head_tensors or {}
            validate_head_tensors(spec, tensors, int(encoder.config.hidden_size))
            for name, tensor in tensors.items():
                self.head[name.replace(".", "__")] = nn.Parameter(tensor.detach().clone(), requires_grad=False)
        # Mirror the shared encoder's mode: wrapping an eval-mode base must not switch it (and its dropout) on
        # when a caller later restores "the model's" mode.
        self.train(encoder.training)

    def head_tensors(self) -> dict[str, torch.Tensor]:
        return {key.replace("__", "."): value for key, value in self.head.items()}

    def logits_from_hidden(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self.spec.mode == "prompt":
            table = self.encoder.get_input_embeddings().weight
            label_embeddings = table[torch.tensor(self.label_ids, device=table.device)]
            assert batch.mask_positions is not None
            return prompt_logits(hidden, batch.mask_positions, label_embeddings)
        assert self.spec.classifier_kind is not None
        return classifier_logits(hidden, self.spec.classifier_kind, self.head_tensors(), self.dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.logits_from_hidden(encoder_hidden(self.encoder, batch), batch)


def init_classifier_head(
    kind: ClassifierKind, num_labels: int, hidden_size: int, base_extra: dict[str, torch.Tensor], seed: int
) -> dict[str, torch.Tensor]:
    """Fresh head tensors: any the base folder ships (BERT's pooler) are reused, the rest drawn N(0, 0.02)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "pooler.dense.weight": (hidden_size, hidden_size),
        "pooler.dense.bias": (hidden_size,),
        "classifier.dense.weight": (hidden_size, hidden_size),
        "classifier.dense.bias": (hidden_size,),
        "classifier.weight": (num_labels, hidden_size),
        "classifier.bias": (num_labels,),
        "classifier.out_proj.weight": (num_labels, hidden_size),
        "classifier.out_proj.bias": (num_labels,),
    }
    tensors: dict[str, torch.Tensor] = {}
    for name in CLASSIFIER_TENSORS[kind]:
        if name in base_extra and tuple(base_extra[name].shape) == shapes[name]:
            tensors[name] = base_extra[name].detach().clone().float()
        elif name.endswith("bias"):
            tensors[name] = torch.zeros(shapes[name])
        else:
            tensors[name] = torch.randn(shapes[name], generator=generator) * 0.02
    return tensors
