"""Three servers that are not fewstep, for `stages.py --idle`'s side-by-side columns: what
concurrency 1 adds on this machine when the model's forward pass only sleeps, or when it
is fashion-edm's real network on ONNX Runtime.

    .venv/bin/python loadtest/handrolled.py fastapi|asgi|floor PORT FORWARD_MS|onnx

FORWARD_MS: the "model" sleeps that long. `onnx`: it is fashion-edm's denoiser (EDM
preconditioning and the UNet) on ONNX Runtime's CPU provider, loaded from model_repo/ by
fewstep's own loader with the threads `fewstep serve` gives it (`Network`): the same pass
fewstep's worker runs for the same request, so what differs is only the serving around it.

- `fastapi`: what a user hand-rolls instead of a serving system (FastAPI + uvicorn with
  their defaults, access log off as fewstep's): a pydantic request model, a sync endpoint
  (FastAPI runs it in its thread pool), torch noise from the seed, the model, then uint8,
  PIL PNG (pillow: the `test` extra) and base64 per image. No queue, no batching, no
  admission, no metrics.
- `asgi`: the HTTP server fewstep runs on (uvicorn, as `fewstep serve` configures it:
  uvloop, httptools) around a bare ASGI callable that does what `floor` does: what the
  server alone adds, so that `fewstep - asgi` is fewstep's own application.
- `floor`: the least a Python HTTP server can do for the same request: stdlib asyncio, one
  keep-alive connection parsed by hand, `json.loads` of the body, the sleep in a thread
  (`asyncio.to_thread`, as a server must to keep its loop free), a fixed small JSON reply.
  What it adds is this machine's floor for any Python service whose pass takes that long.
  With `onnx`, `asgi` and `floor` run the network on one fixed input made at start: no
  per-request tensor work but the pass.

All three answer POST /v1/images/generations with `timings.forward_seconds` (the pass as
measured) so the same raw client subtracts the same thing, and GET /readyz.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint's annotations

import asyncio
import base64
import io
import json
import sys
import time


class Sleep:
    """A forward pass that only sleeps: x0 is x itself."""

    def __init__(self, ms: float) -> None:
        self.seconds = ms / 1000

    def __call__(self, x):
        begin = time.perf_counter()
        time.sleep(self.seconds)
        return x, time.perf_counter() - begin


class Network:
    """fashion-edm's denoiser on ONNX Runtime (CPU), as `fewstep serve` loads it: torch
    on one thread (its `torch_threads` default), ONNX Runtime on one per CPU this process
    may run on (`runtime_threads` 0). A call is one 1-step pass from sigma_max, labelled
    "bag", timed as fewstep's worker times its pass (preconditioning and network)."""

    def __init__(self) -> None:
        import os
        from pathlib import Path

        import torch

        from engines.repository import Repository

        torch.set_num_threads(1)
        threads = len(os.sched_getaffinity(0)) or 1
        repo = Repository(Path(__file__).resolve().parents[1] / "model_repo")
        self.model = repo.load("fashion-edm", runtimes=["onnxruntime"], threads=threads)
        self.sigma_max = self.model.spec.sampling.sigma_max
        self.label = list(self.model.spec.labels).index("bag")
        self.x = torch.randn(1, *self.model.spec.shape) * self.sigma_max  # asgi and floor

    def __call__(self, x):
        import torch

        x = self.x if x is None else x * self.sigma_max
        rows = len(x)
        begin = time.perf_counter()
        with torch.inference_mode():
            sigma = torch.full((rows,), self.sigma_max)
            x0 = self.model.denoiser(x, sigma, {"label": torch.full((rows,), self.label)})
        return x0, time.perf_counter() - begin


def forward_pass(value: str):
    """FORWARD_MS (a sleep) or `onnx` (the real network); ValueError for anything else."""
    if value == "onnx":
        return Network()
    ms = float(value)
    if not 0 <= ms < 60_000:
        raise ValueError(f"FORWARD_MS must be in 0..60000, got {value}")
    return Sleep(ms)


def fastapi_app(model):
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
        x0, forward = model(x)
        pixels = ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        data = []
        for image in pixels:
            buffer = io.BytesIO()
            Image.fromarray(image[0]).save(buffer, format="PNG")
            data.append({"b64_json": base64.b64encode(buffer.getvalue()).decode()})
        return {"created": int(time.time()), "data": data, "timings": {"forward_seconds": forward}}

    return app


def _seconds(model) -> float:
    """The pass on the fixed input, in a thread: its seconds."""
    return model(None)[1]


def _reply(request: dict, forward: float) -> bytes:
    body = {"data": [{"seed": request.get("seed")}] * request.get("n", 1)}
    return json.dumps({**body, "timings": {"forward_seconds": forward}}).encode()


def asgi_app(model):
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
            reply = _reply(request, await asyncio.to_thread(_seconds, model))
        headers = [(b"content-type", b"application/json")]
        headers.append((b"content-length", str(len(reply)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": reply})

    return app


async def floor(port: int, model) -> None:
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
                    reply = _reply(request, await asyncio.to_thread(_seconds, model))
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
        kind, port, forward = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        if kind not in ("fastapi", "asgi", "floor"):
            print(f"unknown server {kind!r}: expected fastapi, asgi or floor", file=sys.stderr)
            return 2
        model = forward_pass(forward)
    except (IndexError, ValueError) as err:
        usage = "usage: handrolled.py fastapi|asgi|floor PORT FORWARD_MS|onnx"
        print(f"{usage} ({err})", file=sys.stderr)
        return 2
    if kind in ("fastapi", "asgi"):
        import uvicorn

        app = (fastapi_app if kind == "fastapi" else asgi_app)(model)
        options = {"loop": "uvloop", "http": "httptools"} if kind == "asgi" else {}
        uvicorn.run(
            app, host="127.0.0.1", port=port, log_level="warning", access_log=False, **options
        )
    else:
        asyncio.run(floor(port, model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
