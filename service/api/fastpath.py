"""The hot route without the framework's per-request machinery.

POST /v1/images/generations is most of what a loaded server answers, and at concurrency 1
Starlette's routing and FastAPI's request handling (dependency solving, body reading,
parameter validation) took about 230 us of a request's ~1 ms on this machine: more than
admission and the worker's scheduling together. This middleware answers that one route
itself, with the same parts in the same order (JSON as FastAPI decodes it, the same
pydantic model in the same validation mode, the same authentication, the same handler),
so a request gets the same response either way:

- a body this path does not take as it stands (no JSON content type, not JSON, not a valid
  GenerationRequest) goes to the app unchanged, which answers it as it always did (the
  same 400 with the same message); parsing has no side effects, so nothing happens twice;
- after that, an error is answered by the app's own exception handler for it (the
  FewstepError mapping in errors.py), as Starlette's ExceptionMiddleware would; an error
  with no handler propagates to the server-error middleware, as before.

It sits inside BodyLimit (the body arrives whole, its size checked) and inside CORS and
TrustedHost, so those apply to it as to every route. The route itself stays registered:
OpenAPI documents it, and tests/service/test_fastpath.py checks both answer alike. Where
FastAPI's OpenTelemetry instrumentation is on for a request (a tracer or meter provider
configured), the router answers it, so its span keeps the route.
"""

from __future__ import annotations

import json

from starlette.requests import Request

from service import wire
from service.api.images import PATH, images_body
from service.schemas import GenerationRequest

_JSON = ("application/json", "application/json; charset=utf-8")


class FastPath:
    """ASGI middleware: answers POST /v1/images/generations directly (see the module doc)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] != "http"
            or scope["path"] != PATH
            or scope["method"] != "POST"
            or scope.get("fastapi.telemetry") is not None  # traced: the router names the route
        ):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        kind = headers.get(b"content-type", b"").decode("latin-1").strip().lower()
        if kind not in _JSON:
            return await self.app(scope, receive, send)
        message = await receive()  # BodyLimit hands the whole body over in one message
        body = message.get("body", b"")

        async def replay():
            nonlocal message
            if message is not None:
                sent, message = message, None
                return sent
            return await receive()

        try:
            req = GenerationRequest.model_validate(json.loads(body))
        except Exception:  # bad JSON, a RecursionError from deep nesting, an invalid request:
            return await self.app(scope, replay, send)  # the route answers it, as before
        app = scope["app"]
        state = app.state.fewstep
        try:
            auth = headers.get(b"authorization")
            caller = state.keys.authenticate(None if auth is None else auth.decode("latin-1"))
            content = await images_body(state, req, caller)
        except Exception as exc:
            handler = _handler(app.exception_handlers, exc)
            if handler is None:
                raise
            response = await handler(Request(scope, replay), exc)
            return await response(scope, replay, send)
        data = wire.dumps(content)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-length", str(len(data)).encode("latin-1")),
                    (b"content-type", b"application/json"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})


def _handler(handlers: dict, exc: Exception):
    """The app's handler for exc: the first of its classes (most specific first) that has
    one, as Starlette's ExceptionMiddleware looks them up."""
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None
