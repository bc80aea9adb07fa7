"""Turning an upload (checkpoint + data + spec) into validated job inputs.

The API runs this before queueing, so a bad upload is answered with a 4xx naming the problem; the job runs it
again on the worker (cheap next to localization) so a worker never trusts what another process checked.
"""

from __future__ import annotations

import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from app.config import Settings, get_settings
from app.grafting.base import BaseModel, EligibleRule
from app.grafting.checkpoint import (
    MAX_CONFIG_JSON_BYTES,
    PICKLE_SUFFIXES,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    split_for_base,
)
from app.grafting.data import DataError, read_user_data
from app.grafting.heads import (
    Example,
    HeadError,
    HeadSpec,
    TaskModel,
    default_classifier_kind,
    detect_classifier_kind,
)
from app.jobs.models import TaskSpec


class UploadError(ValueError):
    """An upload that cannot become a task; ``field`` names the part of the request at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on what an upload may make the server unpack or parse (``Settings`` holds the configured values)."""

    # total uncompressed size a zipped checkpoint may declare, and may expand to when extracted
    max_uncompressed_bytes: int = 2 * 2**30
    # entries in a zip's directory (a model folder has a few dozen at most)
    max_zip_members: int = 1000
    # a JSON file read whole into memory (config.json)
    max_json_bytes: int = MAX_CONFIG_JSON_BYTES

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadLimits:
        return cls(settings.max_uncompressed_bytes, settings.max_zip_members, settings.max_json_bytes)


@dataclass
class JobInputs:
    checkpoint: Checkpoint
    head: HeadSpec
    train: list[Example]
    dev: list[Example]


@dataclass(frozen=True)
class UploadPaths:
    """Files of one upload, as saved under ``<store>/uploads/<job id>/``."""

    folder: Path

    @property
    def spec(self) -> Path:
        return self.folder / "spec.json"

    @property
    def checkpoint(self) -> Path:
        for name in ("checkpoint.safetensors", "checkpoint.zip"):
            if (self.folder / name).is_file():
                return self.folder / name
        raise UploadError("checkpoint", "missing from the upload folder")

    def data(self, which: str) -> Path | None:
        for suffix in (".jsonl", ".csv"):
            if (self.folder / f"{which}{suffix}").is_file():
                return self.folder / f"{which}{suffix}"
        return None


def declared_head(checkpoint: Checkpoint, model_type: str) -> HeadSpec | None:
    """The head the checkpoint's config declares, if any; a malformed declaration is an upload error."""
    try:
        return checkpoint.head_spec(model_type)
    except (HeadError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise UploadError("checkpoint", f"config.json: its head description is malformed: {exc}") from exc


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
                raise UploadError(
                    "checkpoint",
                    f"the zip declares {declared} bytes uncompressed, over max_uncompressed_bytes="
                    f"{limits.max_uncompressed_bytes}",
                )
            chosen = _choose_members(members)
            target.mkdir(parents=True, exist_ok=True)
            budget = limits.max_uncompressed_bytes
            for name, info in chosen.items():
                cap = min(info.file_size, limits.max_json_bytes) if name == "config.json" else info.file_size
                if info.file_size > cap:
                    raise UploadError(
                        "checkpoint",
                        f"{name} in the zip is {info.file_size} bytes, over max_json_bytes={limits.max_json_bytes}",
                    )
                with zf.open(info) as source, (target / name).open("wb") as sink:
                    budget -= _copy_counted(source, sink, name, min(cap, budget), limits)
    except ZIP_ERRORS as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise UploadError("checkpoint", f"not a readable zip archive ({type(exc).__name__}: {exc})") from None
    except UploadError:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def _too_many_members(count: int, limits: UploadLimits) -> UploadError:
    return UploadError("checkpoint", f"the zip holds {count} entries, over max_zip_members={limits.max_zip_members}")


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
            raise UploadError("checkpoint", f"the zip holds {len(shallowest)} files named {name} at the same level")
        chosen[name] = shallowest[0]
    if "model.safetensors" not in chosen:
        pickled = [info.filename for info in members if info.filename.lower().endswith(PICKLE_SUFFIXES)]
        hint = f" (found {PurePosixPath(pickled[0]).name}: pickle checkpoints are refused)" if pickled else ""
        raise UploadError("checkpoint", f"the zip holds no model.safetensors{hint}")
    return chosen


def _copy_counted(source: IO[bytes], sink: IO[bytes], name: str, allowed: int, limits: UploadLimits) -> int:
    """Copy at most ``allowed`` bytes; a member that yields more is refused, whatever its header said."""
    written = 0
    while block := source.read(1 << 20):
        written += len(block)
        if written > allowed:
            raise UploadError(
                "checkpoint",
                f"{name} in the zip expands beyond its declared size or the limits "
                f"(max_uncompressed_bytes={limits.max_uncompressed_bytes}, max_json_bytes={limits.max_json_bytes})",
            )
        sink.write(block)
    return written


def resolve_head(
    spec: TaskSpec,
    checkpoint: Checkpoint,
    declared: HeadSpec | None,
    data_labels: tuple[str, ...],
    model_type: str,
) -> HeadSpec:
    """The task's head: the spec's fields first, then what the checkpoint declares, then the data's labels."""
    mode = spec.mode or (declared.mode if declared else ("classifier" if checkpoint.head else "prompt"))
    labels = tuple(spec.labels or (declared.labels if declared else data_labels))
    try:
        if mode == "prompt":
            if checkpoint.head:
                raise UploadError("spec", "prompt mode, but the checkpoint carries classifier head tensors")
            template = spec.template or (declared.template if declared and declared.mode == "prompt" else None)
            words = spec.label_words or (declared.label_words if declared and declared.mode == "prompt" else None)
            if not template or not words:
                raise UploadError("spec", "prompt mode needs 'template' and 'label_words' (or a checkpoint with them)")
            return HeadSpec("prompt", labels, template, tuple(words))
        kind = detect_classifier_kind(list(checkpoint.head))
        if kind is None:
            raise UploadError(
                "checkpoint",
                "classifier mode, but the checkpoint has no classifier head "
                f"(expected e.g. {default_classifier_kind(model_type)} tensors)",
            )
        rows = checkpoint.head.get("classifier.weight", checkpoint.head.get("classifier.out_proj.weight"))
        if rows is not None and rows.shape[0] != len(labels):
            raise UploadError("spec", f"the classifier head has {rows.shape[0]} outputs, but {len(labels)} labels")
        # Keep only the tensors of the detected kind (a BERT checkpoint may also hold unused extras).
        return HeadSpec("classifier", labels, classifier_kind=kind)
    except HeadError as exc:
        raise UploadError("spec", str(exc)) from exc


def load_job_inputs(
    paths: UploadPaths, spec: TaskSpec, base: BaseModel, extract_dir: Path, limits: UploadLimits | None = None
) -> JobInputs:
    """Read and check everything an upload holds against the base; raise UploadError naming the first problem.

    ``limits`` default to the process's settings (a worker process has the same environment as the API)."""
    limits = limits or UploadLimits.from_settings(get_settings())
    try:
        EligibleRule.parse(spec.eligible)
    except ValueError as exc:
        raise UploadError("spec", str(exc)) from exc
    source = paths.checkpoint
    if source.suffix == ".zip":
        source = extract_checkpoint_zip(source, extract_dir, limits)
    try:
        checkpoint = split_for_base(load_checkpoint(source, max_config_bytes=limits.max_json_bytes), base)
    except CheckpointError as exc:
        raise UploadError("checkpoint", str(exc)) from exc
    train_path = paths.data("train")
    if train_path is None:
        raise UploadError("train", "training data is missing")
    declared = declared_head(checkpoint, base.model_type)
    known_labels = spec.labels or (list(declared.labels) if declared else None)
    try:
        train, data_labels = read_user_data(train_path, known_labels)
    except DataError as exc:
        raise UploadError("train", str(exc)) from exc
    head = resolve_head(spec, checkpoint, declared, data_labels, base.model_type)
    if known_labels is None and head.labels != data_labels:
        train, _ = read_user_data(train_path, head.labels)
    dev: list[Example] = []
    dev_path = paths.data("dev")
    if dev_path is not None:
        try:
            dev, _ = read_user_data(dev_path, head.labels)
        except DataError as exc:
            raise UploadError("dev", str(exc)) from exc
    try:
        TaskModel(base.encoder, head, base.tokenizer, checkpoint.head_tensors(head))
    except HeadError as exc:
        raise UploadError("spec", str(exc)) from exc
    return JobInputs(checkpoint, head, train, dev)
