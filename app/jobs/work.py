"""The localize job: upload → validated inputs → localized mask → evaluated patch → task in the store.

The runner calls ``run_localize_job`` for records of kind ``localize`` (see ``app.jobs.runner.JOB_FUNCTIONS``),
with the runner process's ``JobContext``.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from app.grafting.base import BaseModel, EligibleRule
from app.grafting.calibration import reliability_bins
from app.grafting.evaluate import Evaluator
from app.grafting.localize import LocalizationCancelled, LocalizeConfig, localize
from app.grafting.patch import GraftPatch, build_patch
from app.jobs.context import JobContext, Phases, finish, is_cancelled, start, store_task
from app.jobs.inputs import JobInputs, UploadError, head_tensors_for, load_job_inputs
from app.jobs.models import JobRecord, JobState


def run_localize_job(ctx: JobContext, record: JobRecord) -> dict[str, Any] | None:
    """Run one localize job to its end state. Input errors fail the job (no retry); other errors propagate, so a
    runner with retries tries again."""
    job_id = record.id
    if record.spec is None:
        finish(ctx, job_id, JobState.failed, Phases(), error="a localize job without a task spec")
        return None
    phases = Phases()
    start(ctx, record, record.spec.steps)
    paths = ctx.upload_paths(job_id)
    try:
        phases.enter("load")
        inputs = load_job_inputs(paths, record.spec, ctx.base, paths.folder / "extracted")
        result = _localize_and_publish(ctx, record, inputs, phases)
    except UploadError as exc:
        finish(ctx, job_id, JobState.failed, phases, error=str(exc))
        return None
    except LocalizationCancelled:
        finish(ctx, job_id, JobState.cancelled, phases, error="cancelled")
        return None
    finish(ctx, job_id, JobState.succeeded, phases, result=result)
    shutil.rmtree(paths.folder, ignore_errors=True)
    return result


def _localize_and_publish(ctx: JobContext, record: JobRecord, inputs: JobInputs, phases: Phases) -> dict[str, Any]:
    spec = record.spec
    assert spec is not None  # run_localize_job fails spec-less records before this
    base = ctx.base
    head = head_tensors_for(inputs.checkpoint, inputs.head)

    def report(event: dict[str, Any]) -> None:
        ctx.jobs.update(record.id, progress={k: v for k, v in event.items() if k != "timings"})

    phases.enter("localize")
    config = LocalizeConfig(
        method=spec.method,
        sparsity=spec.sparsity,
        eligible=spec.eligible,
        steps=spec.steps,
        max_step=1.0 if spec.method == "learned" else None,
        seed=spec.seed,
    )
    ctx.jobs.update(record.id, progress={"phase": "localize"})
    found = localize(
        base,
        inputs.checkpoint.body,
        inputs.head,
        inputs.train,
        inputs.dev,
        config,
        head,
        progress=report,
        should_stop=lambda: is_cancelled(ctx, record.id),
    )
    phases.enter("evaluate")
    ctx.jobs.update(record.id, progress={"phase": "evaluate", "mask_size": found.size})
    patch = build_patch(
        base.parameters,
        inputs.checkpoint.body,
        found.mask,
        task=spec.task,
        spec=inputs.head,
        base_fingerprint=base.fingerprint,
        head=head,
        eligible_rule=str(EligibleRule.parse(spec.eligible)),
        eligible_size=found.eligible_size,
        method=found.method,
        source_checkpoint_sha256=inputs.checkpoint.sha256,
    )
    metrics = evaluate_job_patch(base, patch, inputs)
    patch.metrics = metrics
    patch.extra = {"job": record.id, "localize": found.summary()}
    phases.enter("write")
    ctx.jobs.update(record.id, progress={"phase": "write"})

    stored = store_task(ctx, base, patch, record.id)
    return {
        "task": spec.task,
        "etag": stored.etag,
        "mask_size": patch.mask_size,
        "sparsity": patch.sparsity,
        "metrics": metrics,
        "localize": found.summary(),
    }


def evaluate_job_patch(base: BaseModel, patch: GraftPatch, inputs: JobInputs) -> dict[str, Any]:
    """The evaluation report on the dev data, or on the training data when no dev file was uploaded (stated)."""
    examples, split = (inputs.dev, "dev") if inputs.dev else (inputs.train, "train")
    evaluator = Evaluator(base, inputs.head, inputs.checkpoint.body, examples, ft_head=patch.head or None)
    report = evaluator.report(patch)
    # the dashboard's reliability diagram: per-bin accuracy vs confidence of θ_ft and of the graft
    reliability = {
        "ft": reliability_bins(evaluator.ft_logits, evaluator.labels),
        "graft": reliability_bins(evaluator.graft_logits(patch), evaluator.labels),
    }
    return {**report, "evaluated_on": split, "reliability": reliability}


def sweep_failed_uploads(ctx: JobContext) -> int:
    """Delete uploads of failed or cancelled jobs older than the retention; returns how many were removed."""
    if not ctx.uploads_dir.is_dir():
        return 0
    cutoff = time.time() - ctx.failed_upload_retention_h * 3600
    removed = 0
    for folder in ctx.uploads_dir.iterdir():
        record = ctx.jobs.get(folder.name) if folder.name.isalnum() else None
        finished = record is None or record.state in (JobState.failed, JobState.cancelled)
        if folder.is_dir() and finished and folder.stat().st_mtime < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed
