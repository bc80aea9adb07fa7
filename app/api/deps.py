"""Dependencies as ``Annotated`` aliases, so route signatures read like prose."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from app.core.errors import NotReady
from app.core.store import TASK_NAME_PATTERN
from app.engine.service import InferenceService
from app.jobs.service import JobService, StitchService


def get_service(request: Request) -> InferenceService:
    service: InferenceService | None = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        raise NotReady("the service is starting or stopping")
    return service


ServiceDep = Annotated[InferenceService, Depends(get_service)]


def get_jobs(request: Request) -> JobService:
    jobs: JobService | None = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise NotReady("the service is starting or stopping")
    return jobs


JobsDep = Annotated[JobService, Depends(get_jobs)]
TaskName = Annotated[
    str,
    Path(
        pattern=TASK_NAME_PATTERN.pattern,
        description="Task name: 1-64 characters from a-z, 0-9, '_', '.', '-', starting with a letter or digit.",
        examples=["sst2"],
    ),
]


def get_stitching(request: Request) -> StitchService:
    return StitchService(get_jobs(request))


StitchDep = Annotated[StitchService, Depends(get_stitching)]
