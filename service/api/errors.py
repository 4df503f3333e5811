"""What the HTTP surface does around the routes: a body size limit, and the one mapping of
errors to responses (the OpenAI error shape, or the Open Inference Protocol's under /v2)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import FewstepError, InvalidRequest, PayloadTooLarge
from service.parsing import parse_uint


class BodyLimit:
    """ASGI middleware: read the body up to `limit` bytes, refuse anything larger with 413.

    The body is buffered (JSON requests are small) and replayed to the app, so a chunked
    upload without Content-Length is counted as well.
    """

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                length = parse_uint(declared.decode("latin-1"), name="header Content-Length")
            except InvalidRequest as err:
                return await error_response(scope["path"], err)({"type": "http"}, None, send)
            if length > self.limit:
                return await self._refuse(scope, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client went away
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await self._refuse(scope, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, send) -> None:
        err = PayloadTooLarge(f"request body is over {self.limit} bytes; send a smaller request")
        await error_response(scope["path"], err)({"type": "http"}, None, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "header")]
        if error.get("type") == "json_invalid":
            return "the request body is not valid JSON", None
        if error.get("type") == "extra_forbidden":
            parts.append(f"unknown field {'.'.join(loc)!r}; remove it")
        else:
            parts.append(f"{'.'.join(loc) or 'body'}: {error.get('msg')}")
        param = param or ".".join(loc) or None
    return "; ".join(parts), param


def error_response(path: str, err: FewstepError, headers: dict | None = None) -> JSONResponse:
    """The error in the shape of the surface asked: the Open Inference Protocol's
    {"error": "..."} under /v2, the OpenAI shape elsewhere."""
    body = {"error": err.message} if path == "/v2" or path.startswith("/v2/") else err.body()
    return JSONResponse(body, status_code=err.status, headers=headers or err.headers())


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FewstepError)
    async def fewstep_error(request: Request, exc: FewstepError):
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(request.url.path, InvalidRequest(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        err = FewstepError(str(exc.detail))
        err.status, err.type, err.code = exc.status_code, "invalid_request_error", "http_error"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # every route on the path, not only the first that matched
            headers = {"Allow": ", ".join(allowed(app, request.scope))}
            err.message = f"{request.method} is not served here; use {headers['Allow']}"
        return error_response(request.url.path, err, headers)


def _flat(routes):
    """Routes, with those of included routers (included without a prefix here) inlined."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        yield from _flat(inner.routes) if inner is not None else (route,)


def allowed(app: FastAPI, scope) -> list[str]:
    """The methods some route serves on this request's path."""
    methods: set[str] = set()
    for route in _flat(app.router.routes):
        regex, served = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and served and regex.match(scope["path"]):
            methods |= served
    return sorted(methods)
