"""Jobs: submit a fine-tuned checkpoint to be localized in the background, follow it, cancel it."""

from __future__ import annotations

import json
from pathlib import PurePath
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile, status
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from app.api.deps import JobId, JobsDep
from app.api.errors import responses
from app.grafting.checkpoint import PICKLE_SUFFIXES
from app.jobs.errors import InvalidUpload, UnsupportedUpload
from app.jobs.models import JobRecord, JobState, TaskSpec

router = APIRouter(tags=["jobs"])

SPEC_EXAMPLE = json.dumps(
    {
        "task": "sst2",
        "mode": "prompt",
        "template": "{text} It was {mask} .",
        "label_words": ["terrible", "great"],
        "sparsity": 0.01,
        "steps": 10,
        "method": "learned",
        "seed": 0,
    }
)


class JobPublic(JobRecord):
    url: str


def job_public(record: JobRecord) -> JobPublic:
    return JobPublic(**record.model_dump(), url=f"/v1/jobs/{record.id}")


def _parse_spec(raw: str) -> TaskSpec:
    try:
        return TaskSpec.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors()[:5])
        raise InvalidUpload("spec", problems) from exc


def _checkpoint_name(upload: UploadFile) -> str:
    suffix = PurePath(upload.filename or "").suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise UnsupportedUpload("checkpoint", f"{upload.filename}: pickle checkpoints are refused; upload safetensors")
    return "checkpoint.zip" if suffix == ".zip" else "checkpoint.safetensors"


def _data_name(which: str, upload: UploadFile) -> str:
    suffix = PurePath(upload.filename or "").suffix.lower()
    return f"{which}.csv" if suffix in (".csv", ".tsv") else f"{which}.jsonl"


@router.post(
    "/v1/tasks",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Upload a fine-tuned checkpoint and data; a background job localizes it into a new task",
    responses={
        200: {"model": JobPublic, "description": "Identical submission: the existing job"},
        **responses(409, 413, 415, 422, 503),
    },
)
async def submit_task(
    response: Response,
    jobs: JobsDep,
    checkpoint: Annotated[UploadFile, File(description="model.safetensors, or a zip of a model folder")],
    train: Annotated[UploadFile, File(description="training data: JSONL or CSV with text, text_pair?, label")],
    spec: Annotated[str, Form(description="JSON task spec", examples=[SPEC_EXAMPLE])],
    dev: Annotated[UploadFile | None, File(description="optional dev data, same format as train")] = None,
) -> JobPublic:
    task_spec = _parse_spec(spec)
    staging = jobs.staging()
    try:
        for name, upload in (
            (_checkpoint_name(checkpoint), checkpoint),
            (_data_name("train", train), train),
            *([(_data_name("dev", dev), dev)] if dev is not None else []),
        ):
            await run_in_threadpool(staging.save, name, upload.file)
    except BaseException:
        staging.discard()
        raise
    record, created = await run_in_threadpool(jobs.submit, staging, task_spec)
    if not created:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/v1/jobs/{record.id}"
    return job_public(record)


@router.get("/v1/jobs", summary="Recent jobs, newest first", responses=responses(503))
async def list_jobs(
    jobs: JobsDep,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> dict[str, object]:
    items = [job_public(r) for r in await run_in_threadpool(jobs.list, state, limit)]
    return {"items": items, "count": len(items)}


@router.get("/v1/jobs/{job_id}", summary="A job's state, progress, result or error", responses=responses(404, 503))
async def read_job(jobs: JobsDep, job_id: JobId) -> JobPublic:
    return job_public(await run_in_threadpool(jobs.get, job_id))


@router.delete("/v1/jobs/{job_id}", summary="Cancel a queued or running job", responses=responses(404, 503))
async def cancel_job(jobs: JobsDep, job_id: JobId) -> JobPublic:
    return job_public(await run_in_threadpool(jobs.cancel, job_id))
