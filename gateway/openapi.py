"""The OpenAPI document at ``/openapi.json``, made to say what the endpoints really do.

FastAPI documents request bodies from the pydantic models the endpoints take, but knows
nothing of our error shape: it would advertise 422 validation errors (we answer 400 in
OpenAI's shape), no 401/404/413/429/503, no SSE, and no bearer auth. This fixes those.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_ERROR_SCHEMA = {
    "title": "ErrorResponse",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                # OpenAPI 3.1 (what FastAPI emits) is JSON Schema: null is a type, not `nullable`.
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
        }
    },
}
_ERRORS = {
    "400": "Malformed body or invalid field (OpenAI's error shape; `param` names the field)",
    "401": "Missing or wrong API key",
    "404": "Unknown model",
    "413": "Request body above the gateway's limit",
    "429": "Every replica is at capacity; see the Retry-After header",
    "503": "No replica is serving",
}
_GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


def _error_response(description: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/ErrorResponse"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def build_openapi(app: FastAPI, *, auth: bool) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["ErrorResponse"] = _ERROR_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    if auth:
        components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    for path, operations in doc.get("paths", {}).items():
        for op in operations.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if not path.startswith("/v1/"):
                continue
            if auth:
                op["security"] = [{"bearerAuth": []}]
            codes = ["400", "401", "404", "413", "429", "503"] if path in _GENERATION_PATHS else ["401", "404"]
            for code in codes:
                responses[code] = _error_response(_ERRORS[code])
            if path in _GENERATION_PATHS:
                responses["200"] = {
                    "description": "The completion as JSON, or with `stream: true` server-sent events "
                    "(`data: {chunk}` lines ending with `data: [DONE]`)",
                    "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
                }
    if "/health" in doc.get("paths", {}):
        doc["paths"]["/health"]["get"]["responses"]["503"] = {"description": "No replica is serving"}
    return doc


def install_openapi(app: FastAPI, *, auth: bool) -> None:
    """Serve the corrected document at ``/openapi.json`` (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, auth=auth)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
