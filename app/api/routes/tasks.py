"""Tasks: list, read, delete, and upload/download a task's graft patch."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from app.api.deps import ServiceDep, TaskName
from app.api.errors import responses
from app.api.schemas import TaskPublic, TasksPublic
from app.core.errors import LimitExceeded
from app.engine.service import TaskInfo

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


@router.get("", summary="List the stored tasks", responses=responses(503))
async def list_tasks(service: ServiceDep) -> TasksPublic:
    items = [task_public(info) for info in await run_in_threadpool(service.list_tasks)]
    return TasksPublic(items=items, count=len(items))


@router.get("/{name}", summary="A task's metadata and metrics", responses=responses(404, 422, 503))
async def read_task(service: ServiceDep, name: TaskName) -> TaskPublic:
    return task_public(await run_in_threadpool(service.describe_task, name))


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
    responses={201: {"model": TaskPublic, "description": "Task created"}, **responses(400, 409, 413, 422, 503)},
)
async def put_patch(service: ServiceDep, name: TaskName, request: Request, response: Response) -> TaskPublic:
    limit = service.limits.max_patch_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise LimitExceeded(f"patch of {declared} bytes exceeds max_patch_bytes={limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise LimitExceeded(f"patch exceeds max_patch_bytes={limit}")
        chunks.append(chunk)
    info, created = await run_in_threadpool(service.put_patch, name, b"".join(chunks))
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
    stored = await run_in_threadpool(service.patch_file, name)
    return FileResponse(
        stored.path,
        media_type="application/octet-stream",
        filename=f"{name}.safetensors",
        headers={"ETag": f'"{stored.etag}"'},
    )
