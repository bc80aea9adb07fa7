"""Service facts: the base model, the device, the limits."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ServiceDep
from app.api.errors import responses
from app.api.schemas import InfoPublic

router = APIRouter(prefix="/v1", tags=["info"])


@router.get("/info", summary="Base model, device and limits", responses=responses(503))
def read_info(service: ServiceDep) -> InfoPublic:
    return InfoPublic.model_validate(service.info())
