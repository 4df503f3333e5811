"""Three servers that are not fewstep, for `stages.py --idle`'s side-by-side columns: what
concurrency 1 adds on this machine when the model's forward pass only sleeps.

    .venv/bin/python loadtest/handrolled.py fastapi|asgi|floor PORT FORWARD_MS

- `fastapi`: what a user hand-rolls instead of a serving system (FastAPI + uvicorn with
  their defaults, access log off as fewstep's): a pydantic request model, a sync endpoint
  (FastAPI runs it in its thread pool), torch noise from the seed, the "model" (a sleep of
  FORWARD_MS), then uint8, PIL PNG (pillow: the `test` extra) and base64 per image. No
  queue, no batching, no admission, no metrics.
- `asgi`: the HTTP server fewstep runs on (uvicorn, as `fewstep serve` configures it:
  uvloop, httptools) around a bare ASGI callable that does what `floor` does: what the
  server alone adds, so that `fewstep - asgi` is fewstep's own application.
- `floor`: the least a Python HTTP server can do for the same request: stdlib asyncio, one
  keep-alive connection parsed by hand, `json.loads` of the body, the sleep in a thread
  (`asyncio.to_thread`, as a server must to keep its loop free), a fixed small JSON reply.
  What it adds is this machine's floor for any Python service whose pass takes that long.

All three answer POST /v1/images/generations with `timings.forward_seconds` (the sleep as
measured) so the same raw client subtracts the same thing, and GET /readyz.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint's annotations

import asyncio
import base64
import io
import json
import sys
import time


def fastapi_app(forward_s: float):
    import torch
    from fastapi import FastAPI
    from PIL import Image
    from pydantic import BaseModel

    app = FastAPI()

    class Generation(BaseModel):
        model: str
        prompt: str
        n: int = 1
        steps: int = 1
        sampler: str = "euler"
        seed: int = 0

    @app.get("/readyz")
    def ready() -> dict:
        return {"status": "ready"}

    @app.post("/v1/images/generations")
    def generate(request: Generation) -> dict:
        generator = torch.Generator().manual_seed(request.seed)
        x = torch.randn(request.n, 1, 28, 28, generator=generator)
        begin = time.perf_counter()
        time.sleep(forward_s)  # the model
        forward = time.perf_counter() - begin
        pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        data = []
        for image in pixels:
            buffer = io.BytesIO()
            Image.fromarray(image[0]).save(buffer, format="PNG")
            data.append({"b64_json": base64.b64encode(buffer.getvalue()).decode()})
        return {"created": int(time.time()), "data": data, "timings": {"forward_seconds": forward}}

    return app


def _model(forward_s: float) -> float:
    begin = time.perf_counter()
    time.sleep(forward_s)
    return time.perf_counter() - begin


def _reply(request: dict, forward: float) -> bytes:
    body = {"data": [{"seed": request.get("seed")}] * request.get("n", 1)}
    return json.dumps({**body, "timings": {"forward_seconds": forward}}).encode()


def asgi_app(forward_s: float):
    async def app(scope, receive, send):
        if scope["type"] != "http":  # lifespan: nothing to start
            message = await receive()
            while message["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
                message = await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] == "GET":
            reply = b'{"status":"ready"}'
        else:
            request = json.loads(body)
            reply = _reply(request, await asyncio.to_thread(_model, forward_s))
        headers = [(b"content-type", b"application/json")]
        headers.append((b"content-length", str(len(reply)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": reply})

    return app


async def floor(port: int, forward_s: float) -> None:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                if head.startswith(b"GET"):
                    reply = b'{"status":"ready"}'
                else:
                    request = json.loads(body)
                    reply = _reply(request, await asyncio.to_thread(_model, forward_s))
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(reply)}\r\n\r\n".encode()
                    + reply
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> int:
    try:
        kind, port, forward_ms = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    except (IndexError, ValueError):
        print("usage: handrolled.py fastapi|asgi|floor PORT FORWARD_MS", file=sys.stderr)
        return 2
    if kind in ("fastapi", "asgi"):
        import uvicorn

        app = (fastapi_app if kind == "fastapi" else asgi_app)(forward_ms / 1000)
        options = {"loop": "uvloop", "http": "httptools"} if kind == "asgi" else {}
        uvicorn.run(
            app, host="127.0.0.1", port=port, log_level="warning", access_log=False, **options
        )
    elif kind == "floor":
        asyncio.run(floor(port, forward_ms / 1000))
    else:
        print(f"unknown server {kind!r}: expected fastapi, asgi or floor", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
