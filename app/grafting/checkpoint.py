"""Fine-tuned checkpoints: reading (safetensors only, never pickle), checking against the base, and writing.

A checkpoint is a transformers-style folder (``config.json`` + ``model.safetensors``), a bare ``.safetensors``
file, or a zip of such a folder. Key names are normalised to the bare encoder naming, so both
``bert.encoder.layer.0...`` (sequence-classification checkpoints) and ``encoder.layer.0...`` are accepted.
"""

from __future__ import annotations

import json
import shutil
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from app.core.files import atomic_write, sha256_file
from app.grafting.base import BaseModel, EligibleRule, fingerprint_parameters, normalize_state_dict
from app.grafting.bounded_json import BoundedJSONError, loads_bounded
from app.grafting.heads import (
    CLASSIFIER_HEADS,
    HeadError,
    HeadSpec,
    default_classifier_kind,
    detect_classifier_kind,
    family_of,
)
from app.grafting.patch_metadata import PatchMetadataError, head_spec_from_json

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "merges.txt",
    "vocab.json",
    "sentencepiece.bpe.model",
)


# config.json files are a few KiB; transformers' own nest about four levels.
MAX_CONFIG_JSON_BYTES = 4 * 2**20
MAX_CONFIG_JSON_DEPTH = 32


class CheckpointError(ValueError):
    """A checkpoint that cannot be used with this base; the message names the problem."""


class PickledCheckpoint(CheckpointError):
    """A pickle or torch.save checkpoint: refused outright, never opened."""


class CheckpointBaseMismatch(CheckpointError):
    """A well-formed checkpoint fine-tuned from another base: localizing it against this one would graft the
    difference between two pretrained models, not a skill."""


# Frozen tensors (outside the eligible set, e.g. embeddings) of a checkpoint fine-tuned from this base stay within
# this relative distance of the base's; another pretrained model's are of the order of 1.
FROZEN_DRIFT_LIMIT = 0.05


@dataclass
class Checkpoint:
    """Fine-tuned tensors under bare names, split into what the base has (``body``) and what it lacks (``head``)."""

    body: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None

    @property
    def skillgraft(self) -> dict[str, Any]:
        return dict(self.config.get("skillgraft") or {})

    @property
    def head_seed(self) -> int:
        """The seed fine-tuning drew its classifier head with (0 when the checkpoint does not say): scoring
        "pretrained body + the head fine-tuning started from" needs the same draw."""
        training = self.skillgraft.get("training")
        seed = training.get("seed", 0) if isinstance(training, dict) else 0
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0

    def head_tensors(self, spec: HeadSpec) -> dict[str, torch.Tensor]:
        """The head tensors ``spec``'s classifier kind uses (what a patch carries densely); none in prompt mode."""
        if spec.mode == "prompt" or spec.classifier_kind is None:
            return {}
        return {name: self.head[name] for name in CLASSIFIER_HEADS[spec.classifier_kind].tensor_names}

    def head_spec(self, model_type: str) -> HeadSpec | None:
        """The head spec this checkpoint declares (our own ``skillgraft`` config block, or transformers' labels)."""
        info = self.skillgraft
        if info.get("head"):
            return HeadSpec.from_json(info["head"])
        id2label = self.config.get("id2label")
        if self.head and id2label:
            labels = tuple(str(id2label[k]) for k in sorted(id2label, key=lambda key: int(key)))
            kind = detect_classifier_kind(list(self.head)) or default_classifier_kind(model_type)
            return HeadSpec("classifier", labels, classifier_kind=kind)
        return None


PICKLE_PROTOCOLS = {bytes([0x80, version]) for version in range(2, 6)}
ZIP_MAGIC = b"PK\x03\x04"


def looks_pickled(data: bytes) -> bool:
    """Whether ``data`` (a file's first bytes) is a pickle or a torch.save archive rather than a safetensors file.

    A safetensors file starts with an 8-byte header length and then ``{``; its first byte may well be 0x80 (the
    low byte of that length), so the header is looked at before the pickle protocol marker."""
    if data[8:9] == b"{":
        return False
    return data[:2] in PICKLE_PROTOCOLS or data[:4] == ZIP_MAGIC


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickledCheckpoint(f"{path.name}: pickle checkpoints are refused; upload safetensors")
    with path.open("rb") as handle:
        magic = handle.read(9)
    if looks_pickled(magic):
        raise PickledCheckpoint(f"{path.name}: looks like a pickle/torch.save archive; upload safetensors")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path.name}: not a readable safetensors file ({exc})") from exc


def read_config_json(path: Path, max_bytes: int = MAX_CONFIG_JSON_BYTES) -> dict[str, Any]:
    """A checkpoint's ``config.json``: at most ``max_bytes``, UTF-8, a JSON object of bounded depth, and the parts
    this service reads (``skillgraft.head``, ``id2label``) well-typed. Errors name the file."""
    with path.open("rb") as handle:
        data = handle.read(max_bytes + 1)
    try:
        config = loads_bounded(data, max_depth=MAX_CONFIG_JSON_DEPTH, max_bytes=max_bytes)
    except BoundedJSONError as exc:
        raise CheckpointError(f"{path.name}: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path.name}: must hold a JSON object, not {type(config).__name__}")
    info = config.get("skillgraft")
    if info is not None:
        if not isinstance(info, dict):
            raise CheckpointError(f"{path.name}: 'skillgraft' must be an object")
        if info.get("head") is not None:
            try:
                head_spec_from_json(info["head"])
            except PatchMetadataError as exc:
                raise CheckpointError(f"{path.name}: 'skillgraft.head': {exc}") from None
    id2label = config.get("id2label")
    if id2label is not None and not (
        isinstance(id2label, dict)
        and all(key.isascii() and key.isdigit() for key in id2label)
        and all(isinstance(label, str | int) and not isinstance(label, bool) for label in id2label.values())
    ):
        raise CheckpointError(f"{path.name}: 'id2label' must map label ids such as '0' to label names")
    return config


def load_checkpoint(
    path: str | Path, extract_dir: Path | None = None, limits: UploadLimits | None = None
) -> Checkpoint:
    """Read a checkpoint folder, ``.safetensors`` file or zip; tensors are split later by ``split_for_base``."""
    limits = limits or UploadLimits()
    source = Path(path)
    config: dict[str, Any] = {}
    if source.is_file() and zipfile.is_zipfile(source) and source.suffix.lower() == ".zip":
        if extract_dir is None:
            raise CheckpointError("a zipped checkpoint needs a folder to extract into")
        source = extract_checkpoint_zip(source, extract_dir, limits)
    if source.is_dir():
        weights = source / "model.safetensors"
        if not weights.is_file():
            pickled = [p.name for p in source.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
            if pickled:
                raise PickledCheckpoint(
                    f"checkpoint folder has no model.safetensors (found {pickled[0]}: pickle checkpoints are refused)"
                )
            raise CheckpointError("checkpoint folder has no model.safetensors")
        if (source / "config.json").is_file():
            config = read_config_json(source / "config.json", limits.max_json_bytes)
    elif source.is_file():
        weights = source
        sidecar = source.with_name("config.json")
        if sidecar.is_file():
            config = read_config_json(sidecar, limits.max_json_bytes)
    else:
        raise CheckpointError(f"checkpoint {source} not found")
    tensors = read_safetensors(weights)
    try:
        state = normalize_state_dict(tensors)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    return Checkpoint(body=state, head={}, config=config, sha256=sha256_file(weights))


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on what an upload may make the server unpack or parse (``Settings`` holds the configured values)."""

    # total uncompressed size a zipped checkpoint may declare, and may expand to when extracted
    max_uncompressed_bytes: int = 2 * 2**30
    # entries in a zip's directory (a model folder has a few dozen at most)
    max_zip_members: int = 1000
    # a JSON file read whole into memory (config.json)
    max_json_bytes: int = MAX_CONFIG_JSON_BYTES


ZIP_MEMBERS_NEEDED = ("model.safetensors", "config.json")
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, zlib.error)


def extract_checkpoint_zip(archive: Path, target: Path, limits: UploadLimits) -> Path:
    """Unpack the two files a model folder needs (``model.safetensors``, optional ``config.json``) into ``target``.

    The zip's directory is checked before anything is written: entry count, total declared size, one obvious
    candidate per file. While extracting, bytes are counted, so a member that lies about its size is cut off at
    the declared size or the limit. Only those two names are written, so no path inside the archive can escape.
    """
    try:
        with archive.open("rb") as handle:
            # the end record's entry count, read before the directory itself is parsed into memory
            end = zipfile._EndRecData(handle)
        if end is not None and end[zipfile._ECD_ENTRIES_TOTAL] > limits.max_zip_members:
            raise _too_many_members(end[zipfile._ECD_ENTRIES_TOTAL], limits)
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            if len(members) > limits.max_zip_members:
                raise _too_many_members(len(members), limits)
            declared = sum(info.file_size for info in members)
            if declared > limits.max_uncompressed_bytes:
                raise CheckpointError(
                    f"the zip declares {declared} bytes uncompressed, over max_uncompressed_bytes="
                    f"{limits.max_uncompressed_bytes}",
                )
            chosen = _choose_members(members)
            target.mkdir(parents=True, exist_ok=True)
            budget = limits.max_uncompressed_bytes
            for name, info in chosen.items():
                cap = min(info.file_size, limits.max_json_bytes) if name == "config.json" else info.file_size
                if info.file_size > cap:
                    raise CheckpointError(
                        f"{name} in the zip is {info.file_size} bytes, over max_json_bytes={limits.max_json_bytes}",
                    )
                with zf.open(info) as source, (target / name).open("wb") as sink:
                    budget -= _copy_counted(source, sink, name, min(cap, budget), limits)
    except ZIP_ERRORS as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise CheckpointError(f"not a readable zip archive ({type(exc).__name__}: {exc})") from None
    except CheckpointError:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def _too_many_members(count: int, limits: UploadLimits) -> CheckpointError:
    return CheckpointError(f"the zip holds {count} entries, over max_zip_members={limits.max_zip_members}")


def _choose_members(members: list[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
    """The shallowest entry of each needed file name; two at the same depth are ambiguous."""
    chosen: dict[str, zipfile.ZipInfo] = {}
    for name in ZIP_MEMBERS_NEEDED:
        candidates = [info for info in members if not info.is_dir() and PurePosixPath(info.filename).name == name]
        if not candidates:
            continue
        depth = min(len(PurePosixPath(info.filename).parts) for info in candidates)
        shallowest = [info for info in candidates if len(PurePosixPath(info.filename).parts) == depth]
        if len(shallowest) > 1:
            raise CheckpointError(f"the zip holds {len(shallowest)} files named {name} at the same level")
        chosen[name] = shallowest[0]
    if "model.safetensors" not in chosen:
        pickled = [info.filename for info in members if info.filename.lower().endswith(PICKLE_SUFFIXES)]
        if pickled:
            name = PurePosixPath(pickled[0]).name
            raise PickledCheckpoint(
                f"the zip holds no model.safetensors (found {name}: pickle checkpoints are refused)"
            )
        raise CheckpointError("the zip holds no model.safetensors")
    return chosen


def _copy_counted(source: IO[bytes], sink: IO[bytes], name: str, allowed: int, limits: UploadLimits) -> int:
    """Copy at most ``allowed`` bytes; a member that yields more is refused, whatever its header said."""
    written = 0
    while block := source.read(1 << 20):
        written += len(block)
        if written > allowed:
            raise CheckpointError(
                f"{name} in the zip expands beyond its declared size or the limits "
                f"(max_uncompressed_bytes={limits.max_uncompressed_bytes}, max_json_bytes={limits.max_json_bytes})",
            )
        sink.write(block)
    return written


def split_for_base(checkpoint: Checkpoint, base: BaseModel) -> Checkpoint:
    """Check a checkpoint against the base and separate the encoder tensors from the head tensors.

    Refuses (naming the first offenders) missing encoder tensors, shape or dtype mismatches, non-finite values
    and tensors that are neither part of the base nor a known head.
    """
    params = base.parameters
    state = {**checkpoint.body, **checkpoint.head}
    body: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    known_head = {name for head in CLASSIFIER_HEADS.values() for name in head.tensor_names}
    for name, tensor in state.items():
        if name in params:
            expected = params[name]
            if tuple(tensor.shape) != tuple(expected.shape):
                problems.append(f"{name}: shape {tuple(tensor.shape)}, base has {tuple(expected.shape)}")
            elif tensor.dtype != expected.dtype:
                problems.append(f"{name}: dtype {tensor.dtype}, base has {expected.dtype}")
            else:
                body[name] = tensor
        elif name in known_head:
            head[name] = tensor
        else:
            problems.append(f"{name}: not a parameter of the base ({base.name}) nor of a classifier head")
    missing = [name for name in params if name not in body and name not in state]
    if missing:
        problems.append(f"missing base parameters: {', '.join(missing[:3])}" + (" …" if len(missing) > 3 else ""))
    if problems:
        raise CheckpointError("checkpoint does not match the base: " + "; ".join(problems[:5]))
    for name, tensor in {**body, **head}.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"checkpoint tensor {name!r} holds NaN or Inf values")
    split = Checkpoint(body=body, head=head, config=checkpoint.config, sha256=checkpoint.sha256)
    check_same_base(split, base)
    return split


def check_same_base(checkpoint: Checkpoint, base: BaseModel) -> None:
    """Refuse a checkpoint fine-tuned from another base: by its declared base fingerprint when it has one (ours
    do), else by its frozen tensors (those outside the eligible set), which a fine-tune leaves (nearly) alone."""
    declared = checkpoint.skillgraft.get("base_fingerprint")
    if isinstance(declared, str) and declared:
        if declared != base.fingerprint:
            raise CheckpointBaseMismatch(
                f"checkpoint was fine-tuned from base {declared[:23]}…, this server runs {base.fingerprint[:23]}…"
            )
        return
    rule = EligibleRule()
    params = base.parameters
    for name, tensor in checkpoint.body.items():
        if rule.admits(name) or not tensor.is_floating_point():
            continue
        reference = params[name].detach().to(tensor.device, torch.float64)
        drift = float(torch.linalg.vector_norm(tensor.double() - reference))
        scale = float(torch.linalg.vector_norm(reference)) or 1.0
        if drift / scale > FROZEN_DRIFT_LIMIT:
            frozen = [n for n in checkpoint.body if not rule.admits(n)]
            theirs = fingerprint_parameters({n: checkpoint.body[n] for n in frozen})
            ours = fingerprint_parameters({n: params[n] for n in frozen})
            raise CheckpointBaseMismatch(
                f"checkpoint's {name!r} differs from the base's by {drift / scale:.2f} of its norm: it was not "
                f"fine-tuned from this base (frozen tensors {theirs[:23]}… vs the base's {ours[:23]}…)"
            )


def save_checkpoint(
    folder: str | Path,
    base: BaseModel,
    body: Mapping[str, torch.Tensor],
    spec: HeadSpec,
    head: Mapping[str, torch.Tensor] | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write a transformers-compatible folder: ``model.safetensors``, ``config.json`` and the tokenizer files.

    Classifier checkpoints use the ``*ForSequenceClassification`` key layout (encoder under the base-model
    prefix), so ``AutoModelForSequenceClassification.from_pretrained`` loads them as they are.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((base.path / "config.json").read_text())
    # decoders keep the *ForCausalLM layout in both modes, so the folder loads as the LM it is
    prefix = _prefix_for(base.model_type) if spec.mode == "classifier" or base.family == "decoder" else ""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in body.items():
        tensors[prefix + name] = tensor.detach().to("cpu").contiguous()
    for name, tensor in (head or {}).items():
        key = prefix + name if name.startswith("pooler.") else name
        tensors[key] = tensor.detach().to("cpu").contiguous()
    if spec.mode == "classifier":
        config["architectures"] = [_classifier_architecture(base.model_type)]
        config["num_labels"] = spec.num_labels
        config["id2label"] = {str(i): label for i, label in enumerate(spec.labels)}
        config["label2id"] = {label: i for i, label in enumerate(spec.labels)}
    config["skillgraft"] = {"head": spec.to_json(), "base_fingerprint": base.fingerprint, "training": training or {}}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    for name in TOKENIZER_FILES:
        if (base.path / name).is_file():
            shutil.copyfile(base.path / name, out / name)
    return out


def _prefix_for(model_type: str) -> str:
    """Key prefix of the body in transformers' task classes (decoders: ``model.`` as in *ForCausalLM)."""
    if family_of(model_type) == "decoder":
        return "model."
    return {"bert": "bert.", "roberta": "roberta.", "xlm-roberta": "roberta.", "mpnet": "mpnet."}.get(model_type, "")


def _classifier_architecture(model_type: str) -> str:
    return {
        "bert": "BertForSequenceClassification",
        "roberta": "RobertaForSequenceClassification",
        "xlm-roberta": "XLMRobertaForSequenceClassification",
        "mpnet": "MPNetForSequenceClassification",
    }.get(model_type, "AutoModelForSequenceClassification")


@dataclass(frozen=True)
class HeadOverrides:
    """Head fields a caller states (a job's spec, CLI flags); unset fields come from the checkpoint or the data."""

    mode: str | None = None
    labels: tuple[str, ...] | None = None
    template: str | None = None
    label_words: tuple[str, ...] | None = None


class HeadResolutionError(CheckpointError):
    """No usable head from what was stated and what the checkpoint declares; ``field`` names the part at fault
    (``spec``: the stated fields, ``checkpoint``: its tensors or config)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def resolve_head(
    checkpoint: Checkpoint,
    model_type: str,
    overrides: HeadOverrides | None = None,
    data_labels: tuple[str, ...] = (),
) -> HeadSpec:
    """The task's head, the one rule for the CLI and the jobs: stated fields first, then what the checkpoint
    declares (its ``skillgraft`` block or transformers' labels), then the data's labels."""
    stated = overrides or HeadOverrides()
    try:
        declared = checkpoint.head_spec(model_type)
    except (HeadError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise HeadResolutionError("checkpoint", f"config.json: its head description is malformed: {exc}") from exc
    mode = stated.mode or (declared.mode if declared else ("classifier" if checkpoint.head else "prompt"))
    labels = tuple(stated.labels or (declared.labels if declared else data_labels))
    try:
        if mode == "prompt":
            if checkpoint.head:
                raise HeadResolutionError("spec", "prompt mode, but the checkpoint carries classifier head tensors")
            from_checkpoint = declared if declared and declared.mode == "prompt" else None
            template = stated.template or (from_checkpoint.template if from_checkpoint else None)
            words = stated.label_words or (from_checkpoint.label_words if from_checkpoint else None)
            if not template or not words:
                raise HeadResolutionError(
                    "spec", "prompt mode needs 'template' and 'label_words' (or a checkpoint that declares them)"
                )
            return HeadSpec("prompt", labels, template, tuple(words))
        kind = detect_classifier_kind(list(checkpoint.head))
        if kind is None:
            raise HeadResolutionError(
                "checkpoint",
                "classifier mode, but the checkpoint has no classifier head "
                f"(expected e.g. {default_classifier_kind(model_type)} tensors)",
            )
        rows = checkpoint.head.get("classifier.weight", checkpoint.head.get("classifier.out_proj.weight"))
        if rows is not None and rows.shape[0] != len(labels):
            raise HeadResolutionError(
                "spec", f"the classifier head has {rows.shape[0]} outputs, but {len(labels)} labels"
            )
        return HeadSpec("classifier", labels, classifier_kind=kind)
    except HeadError as exc:
        raise HeadResolutionError("spec", str(exc)) from exc
