"""Liveness and readiness probes (unversioned: orchestrators call them)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.api.errors import responses
from app.api.schemas import HealthPublic, ReadyPublic
from app.core.errors import NotReady

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness: the process answers")
def health() -> HealthPublic:
    return HealthPublic()


@router.get(
    "/ready",
    summary="Readiness: the base is loaded and the engine runs",
    description="With an object store, `store` says whether it answers. A replica that cannot reach it stays "
    "ready: it serves the tasks it has cached and answers 503 for the rest.",
    responses=responses(503),
    response_model_exclude_none=True,
)
def ready(request: Request) -> ReadyPublic:
    service = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        raise NotReady("the base model is not loaded yet or the engine has stopped")
    if not service.store.remote:
        return ReadyPublic()
    health = service.store_health()
    if health.reachable:
        return ReadyPublic(store="reachable")
    return ReadyPublic(store="unreachable", store_detail=health.detail)
