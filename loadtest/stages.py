"""Where a request's time goes at concurrency 1: perf_counter at each stage inside the server.

    .venv/bin/python loadtest/stages.py [--seconds 8] [--env FEWSTEP_RUNTIME=simulated ...]

Starts `fewstep serve` (fashion-edm, HTTP only) in a child process with timestamps hooked
onto its stages (uvicorn's protocol, the fast path, the worker's start and tick), sends
n=1, euler, 1-step requests one after another with the raw socket client, and prints the
p50 of each stage and the client's added latency (latency minus forward time). `--env`
passes settings to the server: `FEWSTEP_RUNTIME=simulated` (H200 curve) or with
`FEWSTEP_LATENCY_CURVE=loadtest/curves/cpu-onnx-fashion-edm.yaml`, `FEWSTEP_RUNTIME_THREADS=1`,
`FEWSTEP_INLINE_LONE_MS=0` (the pass in the compute thread). The hooks wrap internal
functions by name: a diagnostic, not an API.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = (
    ("bytes in -> request parsed", "in", "parsed"),
    ("parsed -> ASGI app -> endpoint", "parsed", "endpoint"),
    ("endpoint -> worker start", "endpoint", "start"),
    ("worker start (noise, grid, sampler)", "start", "started"),
    ("the tick outside the forward pass", "started", "ticked"),
    ("result -> endpoint -> response written", "ticked", "out"),
)


def serve(out: str, argv: list[str]) -> None:
    """The child: fewstep serve with the stage hooks; records written to `out` at exit."""
    import atexit

    from uvicorn.protocols.http import httptools_impl as h

    import service.api.fastpath as fastpath
    import service.worker.loop as loop

    clock, records, now = time.perf_counter, [], {}

    def wrap(owner, name, before=None, after=None, is_async=False):
        original = getattr(owner, name)
        if is_async:

            async def hooked(*a, **k):
                if before:
                    before()
                result = await original(*a, **k)
                if after:
                    after(result)
                return result
        else:

            def hooked(*a, **k):
                if before:
                    before()
                result = original(*a, **k)
                if after:
                    after(result)
                return result

        setattr(owner, name, hooked)

    def arrived():
        now.clear()
        now["in"] = clock()

    def ticked(result):
        now["ticked"], now["forward"] = clock(), result[1]

    wrap(h.HttpToolsProtocol, "data_received", before=arrived)
    wrap(h.HttpToolsProtocol, "on_message_complete", before=lambda: now.update(parsed=clock()))
    wrap(fastpath, "images_body", before=lambda: now.update(endpoint=clock()), is_async=True)
    wrap(loop, "start", before=lambda: now.update(start=clock()))
    wrap(loop, "start", after=lambda _: now.update(started=clock()))
    wrap(loop, "step_batch", after=ticked)
    original_send = h.RequestResponseCycle.send

    async def send(self, message):
        await original_send(self, message)
        if message.get("type") == "http.response.body" and "ticked" in now:
            now["out"] = clock()
            records.append(dict(now))

    h.RequestResponseCycle.send = send
    atexit.register(lambda: Path(out).write_text(json.dumps(records)))
    from service.cli import main

    sys.argv[0] = "fewstep"
    main(argv)


def drive(args) -> None:
    from loadtest.procs import Processes, free_port
    from loadtest.rawclient import raw_sequential

    out = Path(tempfile.mkdtemp()) / "stages.json"
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", str(out), "serve", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--no-grpc", "--log-level", "warning"]
    env = {"FEWSTEP_MODELS": '["fashion-edm"]', **dict(e.split("=", 1) for e in args.env)}
    body = {"model": "fashion-edm", "prompt": "bag", "n": 1, "steps": 1, "sampler": "euler"}
    bodies = [dict(body, seed=i) for i in range(1000)]
    with Processes([cmd], port, env) as server:
        raw_sequential(server.url, bodies, 1.0)  # warm
        print(f"measuring {args.seconds:g} s ...", file=sys.stderr, flush=True)
        outcomes = raw_sequential(server.url, bodies, args.seconds)
    for _ in range(50):  # the child writes its records as it exits
        if out.exists():
            break
        time.sleep(0.1)
    records = json.loads(out.read_text())[-len(outcomes) :]
    p50 = statistics.median
    print(f"| stage (p50, us) | {' '.join(args.env) or 'default settings'} |\n|---|---|")
    for name, a, b in STAGES:
        spent = [r[b] - r[a] - (r["forward"] if b == "ticked" else 0) for r in records]
        print(f"| {name} | {p50(spent) * 1e6:.0f} |")
    server_ms = p50([(r["out"] - r["in"] - r["forward"]) * 1000 for r in records])
    added = p50([(o.latency - o.forward) * 1000 for o in outcomes if o.status == 200])
    forward = p50([r["forward"] * 1000 for r in records])
    print(f"| server, bytes in to response written, minus forward (ms) | {server_ms:.2f} |")
    print(f"| **client: added latency p50 (ms)** | **{added:.2f}** |")
    print(f"| forward pass p50 (ms) | {forward:.2f} |")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    drive(parser.parse_args())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
