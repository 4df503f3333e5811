"""The OpenAPI schema as the server behaves: the error bodies each route can answer with,
who needs a key, and `model` required where more than one model is served.

FastAPI documents a 422 the service never sends (validation errors are 400 here) and no
4xx of its own; this rewrites the generated schema once the models are known, so that a
client generator or schemathesis sees what the server really does.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.state import ServiceState

OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string", "description": "what to change"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
OIP_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "what to change"}},
}
BEARER = {"type": "http", "scheme": "bearer", "description": "an API key of this server"}
REASONS = {
    400: "the request is malformed or does not fit the model; the message says what to change",
    401: "an API key is needed (Authorization: Bearer KEY) and none, or a wrong one, was sent",
    403: "the API key may not do this (a priority outside its limits, a cross-site request)",
    404: "no such model, version or job (another key's jobs are not found either)",
    405: "the method is not served on this path (Allow lists those that are)",
    408: "the request's deadline passed before its result",
    409: "the job is not finished, was canceled, or an Idempotency-Key names another request",
    413: "the request body is too large",
    415: "the Content-Type is not accepted",
    422: "the job ran and failed (non-finite values, an engine error)",
    429: "a quota or the queue is full: retry after Retry-After (x-ratelimit-* say which)",
    503: "not ready, the queue or the speech front end is unavailable: retry after Retry-After",
}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "description": "BYTES, INT64, FP32, ..."},
        "parameters": {"type": "object"},
        "data": {"description": "values, nested as the shape or flat"},
    },
    "additionalProperties": False,
}
INFER_REQUEST = {
    "type": "object",
    "description": "an Open Inference Protocol request: GET /v2/models/{name} lists the "
    "model's inputs and outputs",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "description": "priority, timeout, binary_data_output"},
        "inputs": {"type": "array", "minItems": 1, "items": _TENSOR},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}
INFER_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
        "application/octet-stream": {
            "schema": {"type": "string", "format": "binary"},
            "description": "the JSON header (Inference-Header-Content-Length bytes), then the "
            "binary tensor data",
        },
    },
}
OPEN = ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready")
EMPTY = {  # the Open Inference Protocol's health answers are a status code and no body
    "/v2/health/live": {"200": "the server is live (empty body)"},
    "/v2/health/ready": {
        "200": "the server is ready (empty body)",
        "400": "the server is not ready (empty body)",
    },
}


def _codes(path: str, method: str) -> list[int]:
    if path in ("/healthz",):
        return []
    if path == "/readyz":
        return [503]
    if path == "/metrics":
        return [401]
    codes = [400, 401, 404, 405]
    if method == "post":
        codes += [403, 413, 429, 503]
    if path in ("/v1/images/generations", "/v1/audio/speech") or path.endswith("/infer"):
        codes += [408, 409, 422]
    if path.endswith("/infer"):
        codes.append(415)
    if path.startswith("/v1/jobs/"):
        codes += [409, 422] if path.endswith("/result") else []
    if path.startswith("/v2/models/") and method == "get":
        codes.append(503)
    return sorted(set(codes))


def _error(code: int, schema: str) -> dict:
    return {
        "description": REASONS[code],
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def describe(app: FastAPI, state: ServiceState) -> dict:
    """The schema of `app` as it behaves with `state`'s models and keys."""
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schema.setdefault("components", {}).setdefault("schemas", {})
    components = schema["components"]["schemas"]
    components["Error"], components["OIPError"] = OPENAI_ERROR, OIP_ERROR
    components["InferenceRequest"] = INFER_REQUEST
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    secured = not state.keys.open
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            responses.pop("422", None)
            shape = "OIPError" if path.startswith("/v2") else "Error"
            for code in _codes(path, method):
                responses[str(code)] = _error(code, shape)
            if path.endswith("/infer"):
                operation["requestBody"] = INFER_BODY
            if path in EMPTY:
                responses.clear()
                responses.update({k: {"description": v} for k, v in EMPTY[path].items()})
            protected = path not in OPEN or (path == "/metrics" and state.settings.metrics_auth)
            if secured and protected:
                operation["security"] = [{"HTTPBearer": []}]
            else:
                operation.pop("security", None)
    if secured:
        schema["components"]["securitySchemes"] = {"HTTPBearer": BEARER}
    if len(state.specs) != 1:  # more than one model: a request must name one
        for name in ("GenerationRequest", "SpeechRequest"):
            body = components.get(name)
            if body is not None:
                body["required"] = sorted({*body.get("required", []), "model"})
                body["properties"]["model"] = {"type": "string", "minLength": 1}
    return schema


def install(app: FastAPI, state: ServiceState) -> None:
    """Serve `describe`'s schema at /openapi.json (built once the models are known)."""

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = describe(app, state)
        if state.ready:
            app.openapi_schema = schema
        return schema

    app.openapi = openapi
