"""Service CPU per sample without HTTP: concurrent ASGI calls straight into the app.

    .venv/bin/python loadtest/inprocess.py [--seconds 6] [--clients 32] [--zero-noise]

The app (`service.app.create_app`, embedded queue and worker, fashion-edm on the
`simulated` runtime with the H200 curve) runs in this process; `--clients` coroutines
call it back to back with the cpu part's request of `loadtest/sweep.py` (n=8, dpmpp_2m, 4
steps), and the table gives the process's CPU per sample. Against `sweep.py --parts cpu`
(the same server behind uvicorn, on loopback) the difference is what HTTP costs.
`--zero-noise` replaces the seeded noise by zeros (a measurement of what the noise costs,
never a way to serve: every image is then the same).

    .venv/bin/python loadtest/inprocess.py --lone [--seconds 6]

is concurrency 1 without HTTP: one caller, the lone request of `loadtest/stages.py` (n=1,
euler, 1 step) back to back, a forward pass that costs nothing (the simulated runtime on a
flat 1 us curve), and the table gives the p50 time per request and the CPU per request:
the application's own cost, request to response. Run it from another checkout (`cd
BASELINE && .venv/bin/python loadtest/inprocess.py --lone`) to compare trees side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.app import create_app  # noqa: E402
from service.config import Settings  # noqa: E402

PATH = b"/v1/images/generations"


async def call(app, body: bytes) -> None:
    """One POST through the ASGI app; raises unless it answered 200."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": PATH.decode(),
        "raw_path": PATH,
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"fewstep"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    sent: list[dict] = []
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect while the request runs
        return {}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    if sent[0]["status"] != 200:
        raise RuntimeError(f"status {sent[0]['status']}: {sent[-1].get('body', b'')[:200]!r}")


async def lone(args) -> None:
    """One caller, n=1 euler 1-step requests back to back on a pass that costs nothing."""
    import statistics
    import tempfile

    curve = Path(tempfile.mkdtemp()) / "flat.yaml"
    curve.write_text(
        "device: flat 1 us (loadtest/inprocess.py --lone)\nmodel: fashion-edm\n"
        "seconds:\n  1: 0.000001\n  1024: 0.000001\n"
    )
    settings = Settings(models=["fashion-edm"], runtime="simulated", latency_curve=str(curve))
    app = create_app(settings)
    body = {"model": "fashion-edm", "prompt": "bag", "n": 1, "steps": 1, "sampler": "euler"}
    async with app.router.lifespan_context(app):
        while not app.state.fewstep.ready:
            await asyncio.sleep(0.05)

        async def run(seconds: float) -> list[float]:
            took, seed, stop = [], 0, time.perf_counter() + seconds
            while time.perf_counter() < stop:
                request = json.dumps(dict(body, seed=seed)).encode()
                begin = time.perf_counter()
                await call(app, request)
                took.append(time.perf_counter() - begin)
                seed += 1
            return took

        await run(1.0)  # warm
        print(f"measuring {args.seconds:g} s ...", file=sys.stderr, flush=True)
        cpu = time.process_time()
        took = await run(args.seconds)
        cpu = time.process_time() - cpu
    print("| requests | p50 us / request | p99 us | CPU us / request |\n|---|---|---|---|")
    p99 = statistics.quantiles(took, n=100)[98]
    print(
        f"| {len(took)} | {statistics.median(took) * 1e6:.0f} | {p99 * 1e6:.0f} "
        f"| {cpu / len(took) * 1e6:.0f} |"
    )


async def measure(args) -> None:
    app = create_app(Settings(models=["fashion-edm"], runtime="simulated"))
    async with app.router.lifespan_context(app):
        while not app.state.fewstep.ready:
            await asyncio.sleep(0.05)
        done, stop = 0, 0.0

        async def client(k: int) -> None:
            nonlocal done
            seed = k * 1_000_000
            while time.perf_counter() < stop:
                body = {"model": "fashion-edm", "prompt": "bag", "n": 8, "steps": 4}
                body.update(sampler="dpmpp_2m", seed=seed)
                await call(app, json.dumps(body).encode())
                seed, done = seed + 1, done + 1

        async def run(seconds: float) -> int:
            nonlocal done, stop
            done, stop = 0, time.perf_counter() + seconds
            await asyncio.gather(*(client(k) for k in range(args.clients)))
            return done

        await run(1.0)  # warm
        print(f"measuring {args.seconds:g} s ...", file=sys.stderr, flush=True)
        begin, cpu = time.perf_counter(), time.process_time()
        requests = await run(args.seconds)
        elapsed, cpu = time.perf_counter() - begin, time.process_time() - cpu
    samples = requests * 8
    noise = "zeros (measurement only)" if args.zero_noise else "seeded"
    print("| noise | samples/s | CPU us / sample | samples per CPU-second |\n|---|---|---|---|")
    print(
        f"| {noise} | {samples / elapsed:.0f} | {cpu / samples * 1e6:.1f} | {samples / cpu:.0f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--zero-noise", action="store_true")
    parser.add_argument(
        "--lone", action="store_true", help="concurrency 1: one caller, n=1 1-step requests"
    )
    args = parser.parse_args()
    if args.lone:
        uvloop.run(lone(args))
        return 0
    if args.zero_noise:
        import torch

        from engines.noise import RowNoise

        def zeros(self, shape, dtype=torch.float32, device=None):
            return torch.zeros(tuple(shape), dtype=dtype, device=device)

        RowNoise.randn = zeros
    uvloop.run(measure(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
