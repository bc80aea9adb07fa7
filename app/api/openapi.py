"""The OpenAPI document tells the truth about security: probes and docs need no key, and an open service (no keys
configured) declares no security at all."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.api.auth import OPEN_PATHS

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
                if not secured or OPEN_PATHS.match(path):
                    operation.pop("security", None)
                else:
                    responses = operation.setdefault("responses", {})
                    # the Open Inference Protocol routes answer errors in its own shape: {"error": "..."}
                    content = V2_ERROR_CONTENT if path.startswith("/v2") else ERROR_CONTENT
                    for status, text in (("401", "Missing or invalid API key"), ("403", "The key lacks the scope")):
                        responses.setdefault(status, {"description": text, "content": content})
        if not secured:
            schema.get("components", {}).pop("securitySchemes", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
