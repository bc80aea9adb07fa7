"""Job records and the task spec a user submits with a checkpoint."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from app.core.store import TASK_NAME_PATTERN as STORE_TASK_NAME
from app.grafting.localize import LocalizeConfig, Method

_LOCALIZE = LocalizeConfig()

# One definition of a safe task name: the store's (it builds paths from names).
_TASK_NAME = STORE_TASK_NAME
TASK_NAME_PATTERN = STORE_TASK_NAME.pattern


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _safe_name(what: str) -> AfterValidator:
    def check(value: str) -> str:
        if not _TASK_NAME.fullmatch(value):
            raise ValueError(f"{what} must match {TASK_NAME_PATTERN}")
        return value

    return AfterValidator(check)


_SafeTaskName = Annotated[str, _safe_name("task name")]
_SafeStitchName = Annotated[str, _safe_name("name")]


class _JobSpec(BaseModel):
    """What a user submits for one job; its content hash is part of the job id."""

    model_config = ConfigDict(extra="forbid")

    def content_hash(self) -> str:
        """Hash of everything that changes the result (``replace`` does not)."""
        data = self.model_dump(exclude={"replace"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class TaskSpec(_JobSpec):
    """What to build from an uploaded checkpoint: the task's name, head and localization settings."""

    task: _SafeTaskName = Field(
        ..., description="Task name: lowercase letters, digits, '_', '.', '-'", examples=["sst2"]
    )
    mode: Literal["prompt", "classifier"] | None = Field(
        None, description="Head mode; default: what the checkpoint's config declares"
    )
    labels: list[str] | None = Field(None, description="Label names in id order; default: from the checkpoint/data")
    template: str | None = Field(None, description="Prompt template with {text}, optional {text_pair}, {mask}")
    label_words: list[str] | None = Field(None, description="One label word per label (prompt mode)")
    # Localization settings: LocalizeConfig's defaults, the same the CLI and the benchmarks use.
    sparsity: float = Field(
        _LOCALIZE.sparsity, gt=0, le=1, description="k / |E|: size of γ_base (learned) or of the mask (others)"
    )
    steps: int = Field(_LOCALIZE.steps, ge=0, le=1000, description="Mask optimisation steps (learned method)")
    method: Method = Field(_LOCALIZE.method, description="learned (the paper's), topk, random or topk-rms")
    max_step: float | None = Field(
        _LOCALIZE.max_step,
        gt=0,
        le=100,
        description="Step size rule: each step moves the k-th strongest score by this much (scale-free); "
        "null: the paper's plain step η = 1e7",
    )
    budget: int | None = Field(None, ge=0, description="Hard cap on the mask size in entries (null: none)")
    examples_per_step: int = Field(
        _LOCALIZE.examples_per_step, ge=1, le=100_000, description="Training examples per step (a seeded sample)"
    )
    eligible: str = Field(_LOCALIZE.eligible, description="Eligible-set rule, e.g. 'layers' or 'layers,bias-only'")
    seed: int = Field(0, description="Seeds the scores, the per-step sample and the held-out evaluation split")
    replace: bool = Field(False, description="Replace an existing task of the same name")

    def localize_config(self) -> LocalizeConfig:
        return LocalizeConfig(
            method=self.method,
            sparsity=self.sparsity,
            eligible=self.eligible,
            steps=self.steps,
            max_step=self.max_step,
            budget=self.budget,
            examples_per_step=self.examples_per_step,
            seed=self.seed,
        )

    @model_validator(mode="after")
    def _prompt_words(self) -> TaskSpec:
        if self.label_words is not None and self.labels is not None and len(self.label_words) != len(self.labels):
            raise ValueError("label_words must give one word per label")
        return self


class StitchSpec(_JobSpec):
    """What to stitch: stored tasks merged into one model θ_pre + Σ γ'_i⊙δ_i, published under ``name``."""

    name: _SafeStitchName = Field(
        ..., description="Name of the stitched model; its members are served as <name>.<task>"
    )
    tasks: list[str] = Field(..., min_length=2, max_length=16, description="Stored tasks to stitch (distinct)")
    serve: bool = Field(True, description="Store each member <name>.<task> as a servable task")
    datasets: dict[str, str] = Field(
        default_factory=dict,
        description="Named dataset to score each task on (default: the dataset named like the task, if any)",
    )
    eval_limit: int = Field(300, ge=0, le=100_000, description="Seeded test examples per task (0: no evaluation)")
    replace: bool = Field(False, description="Replace an existing stitched model (and members) of the same name")

    @model_validator(mode="after")
    def _members(self) -> StitchSpec:
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError("tasks must be distinct")
        for task in self.tasks:
            if not _TASK_NAME.fullmatch(task):
                raise ValueError(f"task name {task[:80]!r} must match {TASK_NAME_PATTERN}")
            if not _TASK_NAME.fullmatch(member_name(self.name, task)):
                raise ValueError(f"member name {member_name(self.name, task)!r} is longer than 64 characters")
        return self


def member_name(group: str, task: str) -> str:
    """The served task name of one member of a stitched model."""
    return f"{group}.{task}"


# What a job does: "localize" (an uploaded checkpoint into a task, ``JobRecord.spec``) or "stitch" (stored tasks
# into one model, ``JobRecord.params``). The runner picks the job function by this (``app.jobs.runner``).
JobKind = Literal["localize", "stitch"]


class JobProgress(BaseModel):
    phase: str = "queued"
    step: int = 0
    total: int = 0
    loss: float | None = None
    train_accuracy: float | None = None
    dev_accuracy: float | None = None
    mask_size: int | None = None
    updated_at: str = Field(default_factory=utc_now)


class JobRecord(BaseModel):
    id: str
    kind: JobKind = "localize"
    task: str
    state: JobState = JobState.queued
    progress: JobProgress = Field(default_factory=JobProgress)
    result: dict[str, Any] | None = None
    error: str | None = None
    spec: TaskSpec | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=utc_now)
    updated_at: str = Field(default_factory=utc_now)
    started_at: str | None = None
    finished_at: str | None = None
    attempts: int = 0
    timings: dict[str, float] = Field(default_factory=dict)


def job_id_for(checkpoint_sha256: str, train_sha256: str, dev_sha256: str | None, spec: TaskSpec) -> str:
    """Content address of a job: same checkpoint, data and spec give the same id."""
    digest = hashlib.sha256()
    for part in (checkpoint_sha256, train_sha256, dev_sha256 or "-", spec.content_hash()):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def stitch_job_id(spec: StitchSpec, etags: list[str]) -> str:
    """Content address of a stitch job: same spec and same stored member patches give the same id."""
    digest = hashlib.sha256(b"stitch\0")
    for part in (spec.content_hash(), *etags):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]
