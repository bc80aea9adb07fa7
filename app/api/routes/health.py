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


@router.get("/ready", summary="Readiness: the base is loaded and the engine runs", responses=responses(503))
def ready(request: Request) -> ReadyPublic:
    service = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        raise NotReady("the base model is not loaded yet or the engine has stopped")
    return ReadyPublic()
