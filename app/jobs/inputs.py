"""Turning an upload (checkpoint + data + spec) into validated job inputs.

The API runs this before queueing, so a bad upload is answered with a 4xx naming the problem; the job runs it
again on the worker (cheap next to localization) so a worker never trusts what another process checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.config import Settings, get_settings
from app.grafting.base import BaseModel, EligibleRule
from app.grafting.checkpoint import (
    Checkpoint,
    CheckpointError,
    HeadOverrides,
    HeadResolutionError,
    UploadLimits,
    load_checkpoint,
    resolve_head,
    split_for_base,
)
from app.grafting.data import DataError, read_user_data
from app.grafting.heads import (
    Example,
    HeadError,
    HeadSpec,
    TaskModel,
)
from app.jobs.models import TaskSpec


class UploadError(ValueError):
    """An upload that cannot become a task; ``field`` names the part of the request at fault. Its cause (a
    ``CheckpointError`` subclass, when the checkpoint is at fault) says what kind of refusal it is."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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


def upload_limits(settings: Settings) -> UploadLimits:
    """The configured bounds on what an upload may make the server unpack or parse."""
    return UploadLimits(settings.max_uncompressed_bytes, settings.max_zip_members, settings.max_json_bytes)


def declared_labels(checkpoint: Checkpoint, model_type: str) -> tuple[str, ...] | None:
    """The labels the checkpoint's config declares, if any; a malformed declaration is an upload error."""
    try:
        declared = checkpoint.head_spec(model_type)
    except (HeadError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise UploadError("checkpoint", f"config.json: its head description is malformed: {exc}") from exc
    return declared.labels if declared else None


def load_job_inputs(
    paths: UploadPaths, spec: TaskSpec, base: BaseModel, extract_dir: Path, limits: UploadLimits | None = None
) -> JobInputs:
    """Read and check everything an upload holds against the base; raise UploadError naming the first problem.

    ``limits`` default to the process's settings (a worker process has the same environment as the API)."""
    limits = limits or upload_limits(get_settings())
    try:
        EligibleRule.parse(spec.eligible)
    except ValueError as exc:
        raise UploadError("spec", str(exc)) from exc
    try:
        checkpoint = split_for_base(load_checkpoint(paths.checkpoint, extract_dir, limits), base)
    except CheckpointError as exc:
        raise UploadError("checkpoint", str(exc)) from exc
    train_path = paths.data("train")
    if train_path is None:
        raise UploadError("train", "training data is missing")
    declared = declared_labels(checkpoint, base.model_type)
    known_labels = spec.labels or (list(declared) if declared else None)
    try:
        train, data_labels = read_user_data(train_path, known_labels)
    except DataError as exc:
        raise UploadError("train", str(exc)) from exc
    stated = HeadOverrides(
        spec.mode,
        tuple(spec.labels) if spec.labels else None,
        spec.template,
        tuple(spec.label_words) if spec.label_words else None,
    )
    try:
        head = resolve_head(checkpoint, base.model_type, stated, data_labels)
    except HeadResolutionError as exc:
        raise UploadError(exc.field, str(exc)) from exc
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
