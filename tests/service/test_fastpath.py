"""service/api/fastpath.py answers POST /v1/images/generations before the router: every
request gets what the FastAPI route gives (status, headers, body), and the route itself no
longer runs for a request the fast path takes."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from service.api import images
from service.api.fastpath import FastPath

from .conftest import serve

KEY = "sk-fastpath-test"
AUTH = {"authorization": f"Bearer {KEY}"}
JSON = {"content-type": "application/json"}
VOLATILE = ("created", "timings")  # clocks: differ between any two requests


def _without_fast_path(server):
    """The same service with the route answered by FastAPI (the middleware stack is built
    on the first request, so this is before any)."""
    server.app.user_middleware = [m for m in server.app.user_middleware if m.cls is not FastPath]
    return server


@pytest.fixture(scope="module")
def servers():
    fast, routed = (
        serve(api_key=[KEY], max_body_bytes=4096),
        serve(api_key=[KEY], max_body_bytes=4096),
    )
    with fast, _without_fast_path(routed):
        yield fast.url, routed.url


def _both(servers, body: bytes, headers: dict, method: str = "POST"):
    out = []
    for url in servers:
        with httpx.Client(base_url=url, timeout=30) as c:
            out.append(c.request(method, "/v1/images/generations", content=body, headers=headers))
    return out


def _same(fast: httpx.Response, routed: httpx.Response) -> None:
    assert fast.status_code == routed.status_code, (fast.text, routed.text)
    drop = {"date", "content-length"}  # content-length: the volatile fields' digits
    assert {k: v for k, v in fast.headers.items() if k not in drop} == {
        k: v for k, v in routed.headers.items() if k not in drop
    }
    a, b = fast.json(), routed.json()
    for key in VOLATILE:
        a.pop(key, None), b.pop(key, None)
    assert a == b
    assert int(fast.headers["content-length"]) == len(fast.content)


def _body(**fields) -> bytes:
    return json.dumps({"model": "toy", "prompt": "light", "n": 2, "seed": 7, **fields}).encode()


CASES = {
    "valid": (_body(), {**JSON, **AUTH}),
    "valid, charset": (_body(steps=2), {"content-type": "application/json; charset=utf-8", **AUTH}),
    "valid, unusual case": (_body(), {"content-type": "Application/JSON", **AUTH}),
    "no content type": (_body(), AUTH),
    "text/plain": (_body(), {"content-type": "text/plain", **AUTH}),
    "vendor json": (_body(), {"content-type": "application/vnd.api+json", **AUTH}),
    "not json": (b'{"model": "toy", ', {**JSON, **AUTH}),
    "empty body": (b"", {**JSON, **AUTH}),
    "json, not an object": (b"[1, 2]", {**JSON, **AUTH}),
    "nested too deep": (b"[" * 1500 + b"]" * 1500, {**JSON, **AUTH}),
    "unknown field": (_body(colour="red"), {**JSON, **AUTH}),
    "n too large": (_body(n=10_000), {**JSON, **AUTH}),
    "wrong type": (_body(steps="many"), {**JSON, **AUTH}),
    "NaN": (b'{"model": "toy", "prompt": "light", "guidance_scale": NaN}', {**JSON, **AUTH}),
    "no key": (_body(), JSON),
    "wrong key": (_body(), {**JSON, "authorization": "Bearer sk-wrong"}),
    "bad body and no key": (b"{", JSON),
    "unknown model": (_body(model="nope"), {**JSON, **AUTH}),
    "unknown label": (_body(prompt="purple"), {**JSON, **AUTH}),
    "url format": (_body(response_format="url"), {**JSON, **AUTH}),
    "model fails": (_body(model="nan-model"), {**JSON, **AUTH}),
    "too large": (_body(prompt="light" + " " * 5000), {**JSON, **AUTH}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_answers_as_the_route_does(servers, case):
    body, headers = CASES[case]
    fast, routed = _both(servers, body, headers)
    _same(fast, routed)


def test_other_methods_are_the_routers(servers):
    fast, routed = _both(servers, b"", AUTH, method="GET")
    assert fast.status_code == 405
    _same(fast, routed)


def test_the_route_does_not_run_for_what_the_fast_path_takes(servers, monkeypatch):
    calls = []
    real = images.JSONResponse  # the route's response class: only the route builds it

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(images, "JSONResponse", counting)
    fast, routed = _both(servers, _body(), {**JSON, **AUTH})
    assert fast.status_code == routed.status_code == 200
    assert len(calls) == 1  # the routed server's; the fast path built its response itself
    assert [d["b64_json"] for d in fast.json()["data"]] == [
        d["b64_json"] for d in routed.json()["data"]
    ]


def test_a_traced_request_goes_to_the_router():
    """With FastAPI's OpenTelemetry on, the request carries its telemetry record in the
    scope; the router must answer it so the span gets its http.route."""
    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    scope = {
        "type": "http",
        "method": "POST",
        "path": images.PATH,
        "headers": [(b"content-type", b"application/json")],
        "fastapi.telemetry": object(),
    }
    asyncio.run(FastPath(app)(scope, None, None))
    assert reached == [images.PATH]


def test_deep_nesting_is_a_400_on_both(servers):
    """json.loads raises RecursionError, not ValueError, on deep nesting: the fast path
    must hand it to the route (a 400), not let it become a 500."""
    fast, routed = _both(servers, *CASES["nested too deep"])
    assert fast.status_code == routed.status_code == 400
