"""The pretrained base: offline loading, fingerprint, parameter naming and the eligible set.

Everything here works on plain ``torch.nn.Module`` bodies (encoders, and decoders without their LM head) loaded
with transformers' Auto classes; nothing imports web, queue or storage code, so the CLI, the server and the
workers share it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# Offline before transformers is imported anywhere through this module: weights come from disk only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from app.core.files import sha256_file  # noqa: E402
from app.grafting.heads import Family, family_of  # noqa: E402
from app.grafting.packaged_bases import DEFAULT_BASE, PACKAGED_BASES, BaseModelError  # noqa: E402

# The load report lists the pooler we leave out on purpose as "unexpected": not worth a warning.
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

# Prefixes that transformers' *ForSequenceClassification / *ForMaskedLM / *ForCausalLM wrappers put before the
# base body's own names.
ENCODER_PREFIXES = ("bert.", "roberta.", "mpnet.", "xlm_roberta.", "distilbert.", "model.")
# Checkpoint tensors that are buffers or tied copies, never task skill: a decoder's LM head is tied to the
# embedding table, which stays frozen.
IGNORED_KEYS = re.compile(r"(^|\.)position_ids$|^lm_head\.weight$")
# Encoder layers (BERT family) and decoder layers (Llama family).
LAYER_PATTERN = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.")


def packaged_base_path(name: str = "all-minilm-l6-v2") -> Path:
    """Where a packaged base's files are (a transformers folder, or a GGUF file)."""
    return PACKAGED_BASES[name].locate()


def base_cache_dir() -> Path:
    """Where GGUF bases are kept once converted to float32 safetensors (``SKILLGRAFT_BASE_CACHE`` overrides)."""
    configured = os.environ.get("SKILLGRAFT_BASE_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "skillgraft" / "bases"


@dataclass
class BaseModel:
    """One pretrained body (an encoder without pooler, or a decoder without LM head) with its tokenizer."""

    name: str
    path: Path
    encoder: nn.Module
    tokenizer: PreTrainedTokenizerBase
    model_type: str
    fingerprint: str
    # Weights the folder holds outside the body (e.g. BERT's pooler): a classifier head starts from them.
    extra_weights: dict[str, torch.Tensor]

    @property
    def family(self) -> Family:
        return family_of(self.model_type)

    @property
    def parameters(self) -> dict[str, torch.Tensor]:
        return dict(self.encoder.named_parameters())

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.encoder.parameters())

    @property
    def word_embeddings(self) -> torch.Tensor:
        return self.encoder.get_input_embeddings().weight

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)


def resolve_base(source: str | Path | None) -> tuple[str, Path]:
    """(display name, folder or GGUF file) for a packaged short name, a path, or None (the default base)."""
    key = DEFAULT_BASE if source is None else str(source)
    packaged = PACKAGED_BASES.get(key.lower())
    if packaged is not None:
        return packaged.display, packaged.locate()
    path = Path(source)  # type: ignore[arg-type]
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.stem, path
    if (path / "config.json").is_file():
        return path.name, path
    known = ", ".join(PACKAGED_BASES)
    raise BaseModelError(f"base model {key!r} is neither a packaged base ({known}) nor a model folder or GGUF file")


def load_base(source: str | Path | None = None, device: str = "cpu", name: str | None = None) -> BaseModel:
    """Load a base without touching any hub: a packaged short name (``smollm2-135m-instruct``, the default,
    or ``all-minilm-l6-v2``), a transformers folder (BERT/RoBERTa/MPNet encoders, Llama-family decoders) or a
    Llama-family GGUF file (dequantized to float32 once and cached as safetensors, keyed by the file's hash).

    The body is put in eval mode with gradients off; callers that train switch them on for what they train.
    """
    display, location = resolve_base(source)
    folder = converted_gguf(location) if location.suffix.lower() == ".gguf" else location
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    kwargs: dict[str, object] = {"local_files_only": True}
    if config.model_type in {"bert", "roberta", "xlm-roberta", "mpnet"}:
        kwargs["add_pooling_layer"] = False
    try:
        encoder = AutoModel.from_pretrained(folder, **kwargs)
    except TypeError:
        kwargs.pop("add_pooling_layer", None)
        encoder = AutoModel.from_pretrained(folder, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoder.eval()
    encoder.requires_grad_(False)
    fingerprint = fingerprint_parameters(dict(encoder.named_parameters()))
    extra = _read_extra_weights(folder, set(dict(encoder.named_parameters())))
    encoder.to(device)
    return BaseModel(name or display, folder, encoder, tokenizer, config.model_type, fingerprint, extra)


def converted_gguf(gguf: Path, cache_dir: Path | None = None) -> Path:
    """A transformers folder (float32 safetensors, config, tokenizer) converted from ``gguf``, made on first use.

    Dequantizing takes seconds and needs the ``gguf`` package; the folder is keyed by the file's SHA-256, written
    under a temporary name and renamed into place, so concurrent first starts never see half a folder.
    """
    root = cache_dir or base_cache_dir()
    folder = root / f"{gguf.stem}-{sha256_file(gguf)[:16]}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, GgufConfig

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
    try:
        try:
            # dequantize=True drops the GGUF quantizer from the loaded model: without it save_pretrained refuses
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                gguf_file=gguf.name,
                local_files_only=True,
                dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True),
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        except (ImportError, ValueError, OSError) as exc:
            raise BaseModelError(f"cannot read GGUF base {gguf}: {exc}") from exc
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # another process won the race: use its folder
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _read_extra_weights(folder: Path, encoder_names: set[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    weights_file = folder / "model.safetensors"
    if not weights_file.is_file():
        return {}
    extra: dict[str, torch.Tensor] = {}
    with safe_open(str(weights_file), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            name = normalize_key(key)
            if name not in encoder_names and not IGNORED_KEYS.search(name) and not name.startswith("embeddings."):
                extra[name] = handle.get_tensor(key)
    return extra


def fingerprint_parameters(parameters: dict[str, torch.Tensor]) -> str:
    """A stable SHA-256 over parameter names, shapes, dtypes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(parameters):
        tensor = parameters[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(repr(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "sha256:" + digest.hexdigest()


def normalize_key(key: str) -> str:
    """Map a checkpoint key to the bare encoder naming (``bert.encoder.layer.0...`` -> ``encoder.layer.0...``)."""
    for prefix in ENCODER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def normalize_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bare names for every tensor; buffers such as ``position_ids`` dropped. Duplicate names are refused."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = normalize_key(key)
        if IGNORED_KEYS.search(name):
            continue
        if name in out:
            raise ValueError(f"checkpoint holds {name!r} twice (as {key!r} and under another prefix)")
        out[name] = tensor
    return out


@dataclass(frozen=True)
class EligibleRule:
    """Which base tensors a graft may touch (the paper's set E).

    Written as a comma-separated string so it fits in patch metadata and on a command line:
    ``layers`` (default: every tensor of the encoder layers), plus optional ``bias-only``, ``no-layernorm``,
    ``from-layer=N``.
    """

    bias_only: bool = False
    no_layernorm: bool = False
    from_layer: int = 0

    @classmethod
    def parse(cls, text: str | None) -> EligibleRule:
        rule = cls()
        if not text:
            return rule
        bias_only, no_layernorm, from_layer = False, False, 0
        for raw in text.split(","):
            token = raw.strip()
            if token in ("", "layers"):
                continue
            if token == "bias-only":
                bias_only = True
            elif token == "no-layernorm":
                no_layernorm = True
            elif token.startswith("from-layer="):
                try:
                    from_layer = int(token.split("=", 1)[1])
                except ValueError as exc:
                    raise ValueError(f"eligible rule {token!r}: from-layer needs an integer") from exc
                if from_layer < 0:
                    raise ValueError("eligible rule: from-layer must be >= 0")
            else:
                raise ValueError(f"unknown eligible rule {token!r}; use layers, bias-only, no-layernorm, from-layer=N")
        return cls(bias_only, no_layernorm, from_layer)

    def __str__(self) -> str:
        parts = ["layers"]
        if self.bias_only:
            parts.append("bias-only")
        if self.no_layernorm:
            parts.append("no-layernorm")
        if self.from_layer:
            parts.append(f"from-layer={self.from_layer}")
        return ",".join(parts)

    def admits(self, name: str) -> bool:
        match = LAYER_PATTERN.match(name)
        if match is None or int(match.group(1)) < self.from_layer:
            return False
        if self.bias_only and not name.endswith(".bias"):
            return False
        return not (self.no_layernorm and is_norm(name))

    def select(self, names: list[str] | dict[str, torch.Tensor]) -> list[str]:
        """The eligible names among ``names``, in their given order (one linear pass)."""
        return [name for name in names if self.admits(name)]


def eligible_size(parameters: dict[str, torch.Tensor], rule: EligibleRule) -> int:
    return sum(parameters[name].numel() for name in rule.select(list(parameters)))


def layer_of(name: str) -> int | None:
    match = LAYER_PATTERN.match(name)
    return int(match.group(1)) if match else None


def is_norm(name: str) -> bool:
    """A normalisation tensor: LayerNorm (encoders) or RMSNorm (decoders' input/post-attention layernorm)."""
    return "layernorm" in name.lower()


def module_type_of(name: str) -> str:
    """Coarse module family of an encoder tensor, for mask reports (query, key, value, attn-out, ffn-in...)."""
    table = (
        ("attention.self.query", "query"),
        ("attention.self.key", "key"),
        ("attention.self.value", "value"),
        ("attention.output.LayerNorm", "attn-layernorm"),
        ("attention.output.dense", "attn-out"),
        ("intermediate.dense", "ffn-in"),
        ("output.LayerNorm", "ffn-layernorm"),
        ("output.dense", "ffn-out"),
        # MPNet / RoBERTa style names
        ("attention.attn.q", "query"),
        ("attention.attn.k", "key"),
        ("attention.attn.v", "value"),
        ("attention.attn.o", "attn-out"),
        ("attention.LayerNorm", "attn-layernorm"),
        # Llama-family decoders
        ("self_attn.q_proj", "query"),
        ("self_attn.k_proj", "key"),
        ("self_attn.v_proj", "value"),
        ("self_attn.o_proj", "attn-out"),
        ("mlp.gate_proj", "ffn-gate"),
        ("mlp.up_proj", "ffn-in"),
        ("mlp.down_proj", "ffn-out"),
        ("input_layernorm", "attn-layernorm"),
        ("post_attention_layernorm", "ffn-layernorm"),
    )
    for needle, label in table:
        if needle in name:
            return label
    return "other"
