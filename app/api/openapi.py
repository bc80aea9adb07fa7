"""The OpenAPI document tells the truth about security: probes and docs need no key, and an open service (no keys
configured) declares no security at all.

The Bearer scheme is written into the document here rather than declared by a FastAPI security dependency: such
a dependency would run on every request only to describe a key ``AuthMiddleware`` has already checked."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.api.auth import BEARER_SCHEME, BEARER_SCHEME_NAME, OPEN_PATHS

ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
V2_ERROR_CONTENT = {
    "application/json": {
        "schema": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
    }
}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        keys = getattr(app.state, "keys", None)
        secured = keys is not None and keys.enabled
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                if not isinstance(operation, dict):
                    continue
                if secured and not OPEN_PATHS.match(path):
                    operation["security"] = [{BEARER_SCHEME_NAME: []}]
                    responses = operation.setdefault("responses", {})
                    # the Open Inference Protocol routes answer errors in its own shape: {"error": "..."}
                    content = V2_ERROR_CONTENT if path.startswith("/v2") else ERROR_CONTENT
                    for status, text in (("401", "Missing or invalid API key"), ("403", "The key lacks the scope")):
                        responses.setdefault(status, {"description": text, "content": content})
        if secured:
            schema.setdefault("components", {})["securitySchemes"] = {BEARER_SCHEME_NAME: BEARER_SCHEME}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
