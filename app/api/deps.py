"""Dependencies as ``Annotated`` aliases, so route signatures read like prose.

Names and ids from the URL are checked here, once, at the HTTP boundary: a task name against the store's pattern
(the store checks again before it builds a path, as the last line of defence), a job id against the form job ids
have, so that nothing malformed travels further down.

Every dependency is ``async def`` though none awaits anything: FastAPI runs a plain ``def`` dependency in its
thread pool, a thread hop (and a GIL hand-over with the inference thread) on every request for a few attribute
reads.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Path, Request

from app.core.errors import NotReady
from app.core.store import TASK_NAME_PATTERN, check_task_name
from app.engine.service import InferenceService
from app.jobs.errors import JobNotFound
from app.jobs.service import JobService, StitchService

# Job ids are content addresses: the first 32 hex digits of a SHA-256 (``app.jobs.models.job_id_for``).
JOB_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
TASK_NAME_RULE = "1-64 characters from a-z, 0-9, '_', '.', '-', starting with a letter or digit"


async def get_service(request: Request) -> InferenceService:
    service: InferenceService | None = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        raise NotReady("the service is starting or stopping")
    return service


ServiceDep = Annotated[InferenceService, Depends(get_service)]


async def get_jobs(request: Request) -> JobService:
    jobs: JobService | None = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise NotReady("the service is starting or stopping")
    return jobs


JobsDep = Annotated[JobService, Depends(get_jobs)]
TaskName = Annotated[
    str,
    Path(
        pattern=TASK_NAME_PATTERN.pattern,
        description=f"Task name: {TASK_NAME_RULE}.",
        examples=["sst2"],
    ),
]


async def get_stitching(request: Request) -> StitchService:
    return StitchService(await get_jobs(request))


StitchDep = Annotated[StitchService, Depends(get_stitching)]


async def valid_job_id(
    job_id: Annotated[str, Path(description="Job id: 32 lowercase hex digits.", examples=["9f2c" + "0" * 28])],
) -> str:
    # an id of another form names no job: answered like any unknown id, never looked up in a store
    if not JOB_ID_PATTERN.fullmatch(job_id):
        raise JobNotFound(f"job {job_id[:64]!r} not found")
    return job_id


JobId = Annotated[str, Depends(valid_job_id)]


async def valid_model_name(model_name: Annotated[str, Path(description=f"Task name: {TASK_NAME_RULE}.")]) -> str:
    """A /v2 model (task) name; a name no task can have is answered as an unknown model by the v2 error shape."""
    return check_task_name(model_name)


ModelName = Annotated[str, Depends(valid_model_name)]
