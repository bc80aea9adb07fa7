"""Stitch jobs: stored task patches merged into one multi-skill model in the background (Localize-and-Stitch).

A stitch job (``JobRecord.kind == "stitch"``, its ``StitchSpec`` in ``params``) loads the named tasks' patches,
computes θ_pre + Σ γ'_i⊙δ_i (:mod:`app.grafting.stitch`), scores each task's single graft against the stitched model
on the task's dataset where one is known, then stores through the task store (a folder or an object store)::

    stitched/<name>/model.safetensors   the stitched encoder as a plain safetensors state dict (bare encoder names)
    stitched/<name>/report.json         tasks, union/overlap summary, per-task accuracy, job id (written last)
    task <name>.<task>                  with ``serve``: each member as a servable task (its own head)

Submission goes through the one job door (``app.jobs.service.StitchService`` → ``JobService.enqueue``); this module
is the job function the runner calls for records of kind ``stitch``, and the stitched models it stores.
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from app.core.errors import TaskNotFound
from app.core.store import STITCHED_DIR, STITCHED_MODEL_FILE, TaskStore, check_task_name
from app.grafting.base import BaseModel
from app.grafting.data import REGISTRY, DataError, load_dataset
from app.grafting.heads import TaskModel, Tokenization
from app.grafting.inference import accuracy, predict_logits
from app.grafting.patch import GraftPatch, grafted, load_patch, validate_for_base
from app.grafting.stitch import StitchError, member_patch, stitch, stitched_state_dict
from app.jobs.context import JobContext, Phases, finish, is_cancelled, start, store_task
from app.jobs.errors import StitchNotFound
from app.jobs.models import JobRecord, JobState, StitchSpec, member_name

EVAL_SEED = 0


class StitchedModels:
    """The stitched models of a task store: each written whole by a job (its report last), read by name."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store

    def exists(self, name: str) -> bool:
        return self.store.stitched_report(check_task_name(name)) is not None

    def report(self, name: str) -> dict[str, Any]:
        report = self.store.stitched_report(check_task_name(name))
        if report is None:
            raise StitchNotFound(f"stitched model {name!r} not found")
        return report

    def model_path(self, name: str) -> Path:
        """A local file holding the stitched model (downloaded once from an object store)."""
        path = self.store.stitched_model(check_task_name(name))
        if path is None:
            raise StitchNotFound(f"stitched model {name!r} not found")
        return path

    def names(self) -> list[str]:
        return self.store.stitched_names()


def run_stitch_job(ctx: JobContext, record: JobRecord) -> dict[str, Any] | None:
    """Run one stitch job to its end state; bad inputs (a task gone, another base) fail it without retry."""
    spec = StitchSpec.model_validate(record.params)
    phases = Phases()
    total = len(spec.tasks)
    start(ctx, record, total)
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
            if is_cancelled(ctx, record.id):
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
    try:
        patch = validate_for_base(load_patch(ctx.tasks.fetch(stored)), base)
    except FileNotFoundError as exc:  # replaced or deleted since ``stat``
        raise TaskNotFound(f"task {task!r} changed while the job read it; submit again") from exc
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
    tokenization = Tokenization(base.tokenizer, patch.spec, family=base.family)
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
    check_task_name(spec.name)
    state = {name: tensor.contiguous() for name, tensor in stitched_state_dict(base.parameters, stitched).items()}
    metadata = {"skillgraft.stitched": json.dumps({"tasks": spec.tasks, "base_fingerprint": base.fingerprint})}
    # the model is staged beside the store (a rename publishes it locally; an object store gets it streamed)
    ctx.tasks.scratch_dir.mkdir(parents=True, exist_ok=True)
    model_file = ctx.tasks.scratch_dir / f"stitched-{uuid.uuid4().hex}.safetensors"
    try:
        save_file(state, str(model_file), metadata=metadata)
        served = []
        if spec.serve:
            for member in members:
                store_task(ctx, base, member, record.id)
                served.append(member.task)
        report = {
            "name": spec.name,
            "job": record.id,
            "tasks": spec.tasks,
            "members": served,
            "base_fingerprint": base.fingerprint,
            **stitched.summary(),
            "accuracy": scores,
            "model": f"{STITCHED_DIR}/{spec.name}/{STITCHED_MODEL_FILE}",
        }
        ctx.tasks.put_stitched(spec.name, model_file, report)
    finally:
        model_file.unlink(missing_ok=True)
    return report
