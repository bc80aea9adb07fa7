"""The localize job: upload → validated inputs → localized mask → evaluated patch → task in the store.

The runner calls ``run_localize_job`` for records of kind ``localize`` (see ``app.jobs.runner.JOB_FUNCTIONS``),
with the runner process's ``JobContext``.
"""

from __future__ import annotations

import time
from typing import Any

from app.grafting.localize import LocalizationCancelled
from app.grafting.pipeline import graft, split_for_evaluation
from app.jobs.context import JobContext, Phases, finish, is_cancelled, start, store_task
from app.jobs.inputs import JobInputs, UploadError, load_job_inputs
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
    try:
        phases.enter("load")
        with ctx.open_upload(job_id) as folder:
            inputs = load_job_inputs(ctx.upload_paths(folder), record.spec, ctx.base, folder / "extracted")
        result = _localize_and_publish(ctx, record, inputs, phases)
    except UploadError as exc:
        finish(ctx, job_id, JobState.failed, phases, error=str(exc))
        return None
    except LocalizationCancelled:
        finish(ctx, job_id, JobState.cancelled, phases, error="cancelled")
        return None
    finish(ctx, job_id, JobState.succeeded, phases, result=result)
    ctx.tasks.delete_upload(job_id)
    return result


def _localize_and_publish(ctx: JobContext, record: JobRecord, inputs: JobInputs, phases: Phases) -> dict[str, Any]:
    spec = record.spec
    assert spec is not None  # run_localize_job fails spec-less records before this
    base = ctx.base

    def report(event: dict[str, Any]) -> None:
        ctx.jobs.update(record.id, progress={k: v for k, v in event.items() if k != "timings"})

    def enter(phase: str) -> None:
        phases.enter(phase)
        ctx.jobs.update(record.id, progress={"phase": phase})

    # no test file in an upload: the pipeline holds out a seeded share, or labels its figures as selection-set
    splits = split_for_evaluation(inputs.train, inputs.dev, seed=spec.seed)
    outcome = graft(
        base,
        inputs.checkpoint,
        inputs.head,
        splits,
        spec.localize_config(),
        task=spec.task,
        progress=report,
        should_stop=lambda: is_cancelled(ctx, record.id),
        extra={"job": record.id},
        on_phase=enter,
    )
    enter("write")
    stored = store_task(ctx, base, outcome.patch, record.id)
    return {
        "task": spec.task,
        "etag": stored.etag,
        "mask_size": outcome.patch.mask_size,
        "sparsity": outcome.patch.sparsity,
        "metrics": outcome.report,
        "localize": outcome.localized.summary(),
    }


def sweep_failed_uploads(ctx: JobContext) -> int:
    """Delete uploads of failed or cancelled jobs older than the retention; returns how many were removed."""
    cutoff = time.time() - ctx.failed_upload_retention_h * 3600
    removed = 0
    for name, modified in ctx.tasks.list_uploads():
        record = ctx.jobs.get(name) if name.isalnum() else None
        finished = record is None or record.state in (JobState.failed, JobState.cancelled)
        if finished and modified < cutoff:
            ctx.tasks.delete_upload(name)
            removed += 1
    return removed
