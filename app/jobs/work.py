"""The one job function: upload → validated inputs → localized mask → evaluated patch → task in the store.

It is run by whichever runner the settings choose (in-process thread, or an RQ worker process) with a
``JobContext`` that holds the long-lived pieces: the base model loaded once per process, the task store and the
job store. The base given here must be the runner's own copy: localization writes into it while it works.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.store import LocalTaskStore
from app.grafting.base import BaseModel, EligibleRule
from app.grafting.calibration import reliability_bins
from app.grafting.evaluate import Evaluator
from app.grafting.localize import LocalizationCancelled, LocalizeConfig, localize
from app.grafting.patch import GraftPatch, build_patch, load_patch, patch_to_bytes, validate_patch
from app.jobs.inputs import JobInputs, UploadError, UploadPaths, head_tensors_for, load_job_inputs
from app.jobs.models import JobRecord, JobState, utc_now
from app.jobs.store import JobStore

log = logging.getLogger("skillgraft.jobs")


@dataclass
class JobContext:
    base_loader: Callable[[], BaseModel]
    tasks: LocalTaskStore
    jobs: JobStore
    uploads_dir: Path
    # hours a failed job's upload stays for inspection; 0 deletes it when the job fails
    failed_upload_retention_h: float = 72.0
    # called with a task name after it is (re)written, e.g. to publish a notice to other replicas
    on_task_written: Callable[[str], None] | None = None
    # named datasets folder for jobs that score on them (None: the default beside the repository)
    data_dir: Path | None = None
    _base: BaseModel | None = None

    @property
    def base(self) -> BaseModel:
        if self._base is None:
            self._base = self.base_loader()
        return self._base

    def upload_paths(self, job_id: str) -> UploadPaths:
        return UploadPaths(self.uploads_dir / job_id)


class Phases:
    """Wall time per phase, recorded into the job as it goes."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._started = time.perf_counter()
        self._phase: str | None = None

    def enter(self, phase: str) -> None:
        now = time.perf_counter()
        if self._phase is not None:
            self.timings[self._phase] = round(now - self._started, 4)
        self._phase, self._started = phase, now

    def close(self) -> dict[str, float]:
        self.enter("done")
        return self.timings


def run_job(ctx: JobContext, job_id: str) -> dict[str, Any] | None:
    """Run one job to its end state. Input errors fail the job (no retry); other errors propagate, so a
    runner with retries tries again."""
    record = ctx.jobs.get(job_id)
    if record is None or record.state.finished:
        return None
    if record.kind == "stitch":
        # imported here: the stitch job module builds on this one's helpers
        from app.jobs.stitching import run_stitch_job

        return run_stitch_job(ctx, record)
    if record.spec is None:
        finish(ctx, job_id, JobState.failed, Phases(), error="a localize job without a task spec")
        return None
    phases = Phases()
    ctx.jobs.update(
        job_id,
        state=JobState.running,
        started_at=utc_now(),
        attempts=record.attempts + 1,
        progress={"phase": "load", "step": 0, "total": record.spec.steps},
    )
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
    assert spec is not None  # run_job fails spec-less records before this
    base = ctx.base
    head = head_tensors_for(inputs.checkpoint, inputs.head)

    def report(event: dict[str, Any]) -> None:
        ctx.jobs.update(record.id, progress={k: v for k, v in event.items() if k != "timings"})

    def cancelled() -> bool:
        current = ctx.jobs.get(record.id)
        return current is not None and current.state == JobState.cancelled

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
        should_stop=cancelled,
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

    def validate(path: Path) -> None:
        validate_patch(load_patch(path), base.parameters, base.fingerprint, base.hidden_size)

    stored = ctx.tasks.write_patch(spec.task, patch_to_bytes(patch), validate, source=f"job:{record.id}")
    if ctx.on_task_written is not None:
        ctx.on_task_written(spec.task)
    return {
        "task": spec.task,
        "etag": stored.etag,
        "mask_size": patch.mask_size,
        "sparsity": patch.sparsity,
        "metrics": metrics,
        "localize": found.summary(),
    }


def finish(
    ctx: JobContext, job_id: str, state: JobState, phases: Phases, result: dict | None = None, error: str | None = None
) -> None:
    ctx.jobs.update(
        job_id,
        state=state,
        result=result,
        error=error,
        finished_at=utc_now(),
        timings=phases.close(),
        progress={"phase": state.value},
    )
    if state == JobState.failed and ctx.failed_upload_retention_h <= 0:
        shutil.rmtree(ctx.upload_paths(job_id).folder, ignore_errors=True)


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
