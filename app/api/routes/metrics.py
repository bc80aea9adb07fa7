"""Prometheus metrics of this process."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.observability import metrics_payload

router = APIRouter(tags=["health"])


@router.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=Response)
def metrics() -> Response:
    payload, content_type = metrics_payload()
    return Response(payload, media_type=content_type)
