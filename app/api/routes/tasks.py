"""Tasks: list, read, delete, and upload/download a task's graft patch."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from app.api.deps import ServiceDep, TaskName
from app.api.errors import responses
from app.api.schemas import TaskPublic, TasksPublic
from app.core.errors import TaskUnusable
from app.engine.service import TaskInfo
from app.grafting.checkpoint import looks_pickled
from app.jobs.errors import UnsupportedUpload

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

PATCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A graft patch file (`patch.safetensors`, e.g. written by `skillgraft localize`).",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def task_public(info: TaskInfo) -> TaskPublic:
    meta = info.metadata
    return TaskPublic(
        name=info.name,
        etag=info.etag,
        size_bytes=info.size_bytes,
        modified_at=info.modified_at,
        cached=info.cached,
        head=meta.get("head"),
        base_fingerprint=meta.get("base_fingerprint"),
        method=meta.get("method"),
        mask_size=meta.get("mask_size"),
        sparsity=meta.get("sparsity"),
        eligible_rule=meta.get("eligible_rule"),
        eligible_size=meta.get("eligible_size"),
        created_at=meta.get("created_at"),
        source_checkpoint_sha256=meta.get("source_checkpoint_sha256"),
        metrics=meta.get("metrics") or {},
        stored=info.record,
        problem=info.problem,
    )


def usable(info: TaskInfo) -> TaskInfo:
    """The task, if its stored patch can be read; else ``TaskUnusable`` naming why (for this task only)."""
    if info.problem:
        raise TaskUnusable(info.problem)
    return info


@router.get(
    "",
    summary="List the stored tasks",
    description="Tasks whose stored patch cannot be read are left out (and logged); reading one by name says why.",
    responses=responses(503),
)
async def list_tasks(service: ServiceDep) -> TasksPublic:
    items = []
    for info in await run_in_threadpool(service.list_tasks):
        if info.problem:
            # one bad file (e.g. written by another tool) must not take the listing down for every caller
            log.warning("task %r left out of the listing: %s", info.name, info.problem)
            continue
        items.append(task_public(info))
    return TasksPublic(items=items, count=len(items))


@router.get("/{name}", summary="A task's metadata and metrics", responses=responses(404, 409, 422, 503))
async def read_task(service: ServiceDep, name: TaskName) -> TaskPublic:
    return task_public(usable(await run_in_threadpool(service.describe_task, name)))


@router.delete(
    "/{name}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a task", responses=responses(404, 422, 503)
)
async def delete_task(service: ServiceDep, name: TaskName) -> Response:
    await run_in_threadpool(service.delete_task, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.put(
    "/{name}/patch",
    summary="Upload a task's graft patch (creates or replaces the task)",
    description="The patch is validated against the running base before it is stored; a bad patch leaves the "
    "store unchanged. Example: `curl -X PUT --data-binary @patch.safetensors "
    "-H 'Content-Type: application/octet-stream' http://localhost:8000/v1/tasks/sst2/patch`.",
    openapi_extra=PATCH_BODY,
    responses={201: {"model": TaskPublic, "description": "Task created"}, **responses(400, 409, 413, 415, 422, 503)},
)
async def put_patch(service: ServiceDep, name: TaskName, request: Request, response: Response) -> TaskPublic:
    # the body-size middleware has already cut off anything over max_patch_bytes (declared or streamed); the
    # service checks the size again for callers that are not HTTP
    data = await request.body()
    if looks_pickled(data):
        raise UnsupportedUpload("patch", "looks like a pickle or torch.save file; patches are safetensors only")
    info, created = await run_in_threadpool(service.put_patch, name, data)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return task_public(info)


@router.get(
    "/{name}/patch",
    summary="Download a task's graft patch",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The patch file"},
        **responses(404, 422, 503),
    },
)
async def get_patch(service: ServiceDep, name: TaskName) -> FileResponse:
    stored, path = await run_in_threadpool(service.patch_file, name)
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{name}.safetensors",
        headers={"ETag": f'"{stored.etag}"'},
    )
