"""Stitch jobs: stored task patches merged into one multi-skill model in the background (Localize-and-Stitch).

A stitch job (``JobRecord.kind == "stitch"``, its ``StitchSpec`` in ``params``) loads the named tasks' patches,
computes θ_pre + Σ γ'_i⊙δ_i (:mod:`app.grafting.stitch`), scores each task's single graft against the stitched model
on the task's dataset where one is known, then writes under the store root::

    stitched/<name>/model.safetensors   the stitched encoder as a plain safetensors state dict (bare encoder names)
    stitched/<name>/report.json         tasks, union/overlap summary, per-task accuracy, job id
    tasks/<name>.<task>/patch.safetensors   with ``serve``: each member as a servable task (its own head)

``StitchService`` is what the API calls: submit, and read the stitched models back. It sits beside
``JobService`` (same job store and runner) rather than inside it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from app.core.errors import TaskNotFound
from app.core.store import check_task_name
from app.grafting.base import BaseModel
from app.grafting.data import REGISTRY, DataError, load_dataset
from app.grafting.heads import TaskModel, Tokenization
from app.grafting.inference import accuracy, predict_logits
from app.grafting.patch import GraftPatch, atomic_write, grafted, load_patch, patch_to_bytes, validate_patch
from app.grafting.stitch import StitchError, member_patch, stitch, stitched_state_dict
from app.jobs.errors import QueueUnavailable, StitchNotFound, TaskExists
from app.jobs.models import JobRecord, JobState, StitchSpec, member_name, stitch_job_id, utc_now
from app.jobs.service import JobService
from app.jobs.work import JobContext, Phases, finish

STITCHED_DIR = "stitched"
MODEL_FILE = "model.safetensors"
REPORT_FILE = "report.json"
EVAL_SEED = 0


class StitchedModels:
    """The ``stitched/`` folder of a store: one folder per stitched model, written whole by a job."""

    def __init__(self, store_root: Path) -> None:
        self.root = store_root / STITCHED_DIR

    def folder(self, name: str) -> Path:
        return self.root / check_task_name(name)

    def exists(self, name: str) -> bool:
        return (self.folder(name) / REPORT_FILE).is_file()

    def report(self, name: str) -> dict[str, Any]:
        try:
            return dict(json.loads((self.folder(name) / REPORT_FILE).read_text()))
        except (FileNotFoundError, ValueError) as exc:
            raise StitchNotFound(f"stitched model {name!r} not found") from exc

    def model_path(self, name: str) -> Path:
        path = self.folder(name) / MODEL_FILE
        if not path.is_file():
            raise StitchNotFound(f"stitched model {name!r} not found")
        return path

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / REPORT_FILE).is_file())


class StitchService:
    """Submits stitch jobs through a ``JobService``'s store and runner; reads finished stitched models."""

    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs
        self.models = StitchedModels(jobs.tasks.root)

    def submit(self, spec: StitchSpec) -> tuple[JobRecord, bool]:
        """Queue a stitch job; an identical earlier submission (same spec, same stored patches) returns its job."""
        etags = []
        for task in spec.tasks:
            stored = self.jobs.tasks.stat(task)
            if stored is None:
                raise TaskNotFound(f"task {task!r} not found")
            etags.append(stored.etag)
        job_id = stitch_job_id(spec, etags)
        existing = self.jobs.jobs.get(job_id)
        if existing is not None and existing.state not in (JobState.failed, JobState.cancelled):
            return existing, False
        if self.models.exists(spec.name) and not spec.replace:
            raise TaskExists(f"stitched model {spec.name!r} exists; submit with replace=true to replace it")
        record = JobRecord(id=job_id, kind="stitch", task=spec.name, params=spec.model_dump())
        if existing is not None:
            self.jobs.jobs.delete(job_id)
        self.jobs.jobs.create(record)
        try:
            self.jobs.runner.submit(job_id)
        except Exception as exc:
            self.jobs.jobs.update(job_id, state=JobState.failed, error=f"could not queue: {exc}")
            raise QueueUnavailable(f"the job queue is unavailable: {exc}") from exc
        return record, True


def run_stitch_job(ctx: JobContext, record: JobRecord) -> dict[str, Any] | None:
    """Run one stitch job to its end state; bad inputs (a task gone, another base) fail it without retry."""
    spec = StitchSpec.model_validate(record.params)
    phases = Phases()
    total = len(spec.tasks)
    ctx.jobs.update(
        record.id,
        state=JobState.running,
        started_at=utc_now(),
        attempts=record.attempts + 1,
        progress={"phase": "load", "step": 0, "total": total},
    )
    base = ctx.base
    try:
        phases.enter("load")
        patches = [_load_member(ctx, base, task) for task in spec.tasks]
        phases.enter("stitch")
        ctx.jobs.update(record.id, progress={"phase": "stitch"})
        stitched = stitch(base.parameters, patches)
        members = [member_patch(stitched, patch, member_name(spec.name, patch.task)) for patch in patches]
        phases.enter("evaluate")
        scores: dict[str, Any] = {}
        for step, (patch, member) in enumerate(zip(patches, members, strict=True), 1):
            current = ctx.jobs.get(record.id)
            if current is not None and current.state == JobState.cancelled:
                finish(ctx, record.id, JobState.cancelled, phases, error="cancelled")
                return None
            scores[patch.task] = _score(ctx, base, spec, patch, member)
            member.metrics = {**scores[patch.task], "stitched_from": spec.tasks}
            ctx.jobs.update(record.id, progress={"phase": "evaluate", "step": step, "total": total})
        phases.enter("write")
        ctx.jobs.update(record.id, progress={"phase": "write"})
        result = _publish(ctx, base, record, spec, stitched, members, scores)
    except (StitchError, TaskNotFound, ValueError) as exc:
        finish(ctx, record.id, JobState.failed, phases, error=str(exc))
        return None
    finish(ctx, record.id, JobState.succeeded, phases, result=result)
    return result


def _load_member(ctx: JobContext, base: BaseModel, task: str) -> GraftPatch:
    stored = ctx.tasks.stat(task)
    if stored is None:
        raise TaskNotFound(f"task {task!r} not found")
    patch = load_patch(stored.path)
    validate_patch(patch, base.parameters, base.fingerprint, base.hidden_size)
    # the stored name is the task's identity here, whatever name the patch was built with
    patch.task = task
    return patch


def _score(ctx: JobContext, base: BaseModel, spec: StitchSpec, patch: GraftPatch, member: GraftPatch) -> dict[str, Any]:
    """Test accuracy of the single graft and of the stitched model with this task's head, where data is known."""
    dataset = spec.datasets.get(patch.task) or (patch.task if patch.task in REGISTRY else None)
    if spec.eval_limit == 0 or dataset is None:
        return {"evaluated": False, "reason": "no evaluation requested" if dataset else "no dataset known for task"}
    try:
        test = load_dataset(dataset, ctx.data_dir).test
    except DataError as exc:
        return {"evaluated": False, "reason": str(exc)}
    if len(test) > spec.eval_limit:
        test = random.Random(EVAL_SEED).sample(test, spec.eval_limit)
    if any(e.label >= patch.spec.num_labels for e in test):
        return {"evaluated": False, "reason": f"dataset {dataset!r} has more labels than the task's head"}
    tokenization = Tokenization(base.tokenizer, patch.spec)
    encoded = tokenization.encode_many(test)
    labels = [e.label for e in test]
    out: dict[str, Any] = {"evaluated": True, "dataset": dataset, "examples": len(test)}
    for key, graft in (("acc_single_graft", patch), ("acc_stitched", member)):
        with grafted(base.parameters, graft):
            model = TaskModel(base.encoder, patch.spec, base.tokenizer, patch.head or None)
            out[key] = accuracy(predict_logits(model, tokenization, encoded, 128), labels)
    out["stitched_minus_single"] = out["acc_stitched"] - out["acc_single_graft"]
    return out


def _publish(
    ctx: JobContext,
    base: BaseModel,
    record: JobRecord,
    spec: StitchSpec,
    stitched: Any,
    members: list[GraftPatch],
    scores: dict[str, Any],
) -> dict[str, Any]:
    models = StitchedModels(ctx.tasks.root)
    folder = models.folder(spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in stitched_state_dict(base.parameters, stitched).items()}
    metadata = {"skillgraft.stitched": json.dumps({"tasks": spec.tasks, "base_fingerprint": base.fingerprint})}
    atomic_write(folder / MODEL_FILE, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    served = []
    if spec.serve:

        def validate(path: Path) -> None:
            validate_patch(load_patch(path), base.parameters, base.fingerprint, base.hidden_size)

        for member in members:
            ctx.tasks.write_patch(member.task, patch_to_bytes(member), validate, source=f"job:{record.id}")
            if ctx.on_task_written is not None:
                ctx.on_task_written(member.task)
            served.append(member.task)
    report = {
        "name": spec.name,
        "job": record.id,
        "tasks": spec.tasks,
        "members": served,
        "base_fingerprint": base.fingerprint,
        **stitched.summary(),
        "accuracy": scores,
        "model": f"{STITCHED_DIR}/{spec.name}/{MODEL_FILE}",
    }
    atomic_write(folder / REPORT_FILE, lambda tmp: tmp.write_text(json.dumps(report, indent=2, sort_keys=True)))
    return report
