"""Several skills together: mask overlap between tasks, where a task's mask sits, and stitching tasks into one
multi-skill model. Which key each route needs is decided by ``app.api.auth.required_scope`` like everywhere."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from app.api.deps import ServiceDep, StitchDep, TaskName
from app.api.errors import responses
from app.api.routes.jobs import JobPublic, job_public
from app.core.errors import InvalidInput, LimitExceeded, TaskUnusable
from app.core.store import check_task_name
from app.engine.service import InferenceService
from app.grafting.evaluate import mask_breakdown, patch_counts
from app.grafting.overlap import OverlapError, overlap_report
from app.grafting.patch import BaseMismatchError, GraftPatch, PatchError, load_patch
from app.jobs.models import StitchSpec

router = APIRouter(tags=["skills"])

OVERLAP_EXAMPLE = {
    "tasks": ["sst2", "cr"],
    "sizes": {"sst2": 106467, "cr": 106467},
    "containment": [[1.0, 0.41], [0.41, 1.0]],
    "jaccard": [[1.0, 0.26], [0.26, 1.0]],
    "intersection": [[106467, 43650], [43650, 106467]],
    "sign_agreement": [[1.0, 0.83], [0.83, 1.0]],
    "per_layer": {"0": {"sizes": {"sst2": 20000, "cr": 19000}, "containment": [[1.0, 0.4], [0.42, 1.0]]}},
}


def _stored_patch(service: InferenceService, name: str) -> GraftPatch:
    try:
        return load_patch(service.patch_file(name)[1])
    except PatchError as exc:  # written badly by another process: the task cannot be used, as when classifying
        raise TaskUnusable(f"task {name!r} has an unusable patch: {exc}") from exc


def _load_patches(service: InferenceService, names: list[str]) -> dict[str, GraftPatch]:
    patches = {}
    for name in names:
        patch = _stored_patch(service, name)
        if patch.base_fingerprint != service.base.fingerprint:
            raise BaseMismatchError(f"task {name!r} was made for another base model")
        patches[name] = patch
    return patches


def _overlap(service: InferenceService, names: list[str]) -> dict[str, Any]:
    patches = _load_patches(service, names)
    # δ is read from the base: no patch may be swapped in meanwhile
    with service.pristine_parameters() as parameters:
        try:
            return overlap_report(patches, parameters)
        except OverlapError as exc:
            raise InvalidInput(str(exc)) from exc


@router.get(
    "/v1/skills/overlap",
    summary="Pairwise mask overlap of stored tasks, overall and per layer",
    description="Matrices indexed [i][j] over `tasks`: containment |γi ∩ γj| / |γj|, Jaccard, intersection size, "
    "and the share of shared entries whose deltas have the same sign (null where nothing is shared).",
    responses={200: {"content": {"application/json": {"example": OVERLAP_EXAMPLE}}}, **responses(404, 409, 413, 422)},
)
async def read_overlap(
    service: ServiceDep,
    tasks: Annotated[str, Query(description="comma-separated task names", examples=["sst2,cr,trec"])],
) -> dict[str, Any]:
    names = list(dict.fromkeys(t.strip() for t in tasks.split(",") if t.strip()))
    if not names:
        raise InvalidInput("name at least one task")
    for name in names:  # the names come from a free-form query string: checked once, here
        check_task_name(name)
    if len(names) > service.limits.max_tasks_per_request:
        raise LimitExceeded(f"{len(names)} tasks exceed max_tasks_per_request={service.limits.max_tasks_per_request}")
    return await run_in_threadpool(_overlap, service, names)


def _mask_layout(service: InferenceService, name: str) -> dict[str, Any]:
    info = service.describe_task(name)
    if info.problem:
        raise TaskUnusable(info.problem)
    # the metadata schema guarantees its shape (app.grafting.patch_metadata.MaskLayout); both breakdowns are shown
    recorded = (info.metadata.get("metrics") or {}).get("mask")
    if recorded and recorded.get("per_layer") and recorded.get("per_module_type") is not None:
        return {"task": name, "source": "metadata", "mask": recorded}
    patch = _stored_patch(service, name)
    layout = {**mask_breakdown(patch_counts(patch)), "eligible_size": patch.eligible_size, "sparsity": patch.sparsity}
    return {"task": name, "source": "patch", "mask": layout}


@router.get(
    "/v1/skills/{name}/mask",
    summary="Where a task's mask sits: entries per encoder layer and module type",
    description="From the metrics the localization job wrote into the patch where present, else counted from it.",
    responses=responses(404, 409, 422),
)
async def read_mask(service: ServiceDep, name: TaskName) -> dict[str, Any]:
    return await run_in_threadpool(_mask_layout, service, name)


@router.post(
    "/v1/stitch",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Stitch stored tasks into one multi-skill model (a background job)",
    description="θ_pre + Σ γ'_i⊙δ_i, each task's delta averaged where masks overlap (Localize-and-Stitch). The job "
    "writes the stitched encoder (`GET /v1/stitch/{name}/model`), a report with per-task accuracy of the stitched "
    "model vs each single graft, and with `serve` each member as task `<name>.<task>` keeping its own head.",
    responses={
        200: {"model": JobPublic, "description": "Identical submission: the existing job"},
        **responses(404, 409, 422, 503),
    },
)
async def submit_stitch(stitching: StitchDep, spec: StitchSpec, response: Response) -> JobPublic:
    record, created = await run_in_threadpool(stitching.submit, spec)
    if not created:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/v1/jobs/{record.id}"
    return job_public(record)


@router.get("/v1/stitch", summary="Names of the stitched models", responses=responses(503))
async def list_stitched(stitching: StitchDep) -> dict[str, Any]:
    names = await run_in_threadpool(stitching.models.names)
    return {"items": names, "count": len(names)}


@router.get(
    "/v1/stitch/{name}",
    summary="A stitched model's report: tasks, overlap summary, per-task accuracy",
    responses=responses(404, 422, 503),
)
async def read_stitched(stitching: StitchDep, name: TaskName) -> dict[str, Any]:
    return await run_in_threadpool(stitching.models.report, name)


@router.get(
    "/v1/stitch/{name}/model",
    summary="Download the stitched encoder as a safetensors state dict",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "model.safetensors"},
        **responses(404, 422, 503),
    },
)
async def download_stitched(stitching: StitchDep, name: TaskName) -> FileResponse:
    path = await run_in_threadpool(stitching.models.model_path, name)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{name}.safetensors")
