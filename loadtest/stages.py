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

    .venv/bin/python loadtest/stages.py --idle 0.25,1,3,6,12,onnx [--seconds 5]

runs the same requests against forward passes that only sleep (the simulated runtime with
a flat curve of each length) and prints the added latency per length: the service's work
is the same in every row, so what changes with the length is the machine's. On this VM it
grows with the wait (README, "Concurrency 1 with a CPU engine"). `onnx` is a row with
fashion-edm's real network on ONNX Runtime's CPU provider instead of a sleep. Beside each
row, in the same run and with the same client and the same pass, three servers that are
not fewstep (loadtest/handrolled.py): a hand-rolled FastAPI endpoint, a bare ASGI app on
uvicorn (the HTTP server fewstep runs on, alone) and a stdlib asyncio server (the floor).

    .venv/bin/python loadtest/stages.py --cold 0.2,1,3,8,20

starts no server: how much slower the same small JSON work runs right after this thread
spun for each length than back to back (procs.cold_curve), the machine's own cold-cache
curve. The stage table's last row gives it at the forward pass's length.
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


def lone_requests() -> list[dict]:
    """The requests every server here is sent: n=1, euler, 1 step, a seed each."""
    body = {"model": "fashion-edm", "prompt": "bag", "n": 1, "steps": 1, "sampler": "euler"}
    return [dict(body, seed=i) for i in range(1000)]


def measure(args, env: dict[str, str]) -> tuple[list[dict], list]:
    """One server with the stage hooks, n=1 requests back to back for args.seconds: the
    server's stage records and the client's outcomes, matched from the end."""
    from loadtest.procs import Processes, free_port
    from loadtest.rawclient import raw_sequential

    out = Path(tempfile.mkdtemp()) / "stages.json"
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", str(out), "serve", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--no-grpc", "--log-level", "warning"]
    env = {"FEWSTEP_MODELS": '["fashion-edm"]', **env}
    bodies = lone_requests()
    with Processes([cmd], port, env) as server:
        raw_sequential(server.url, bodies, 1.0)  # warm
        print(f"measuring {args.seconds:g} s ...", file=sys.stderr, flush=True)
        outcomes = raw_sequential(server.url, bodies, args.seconds)
    for _ in range(50):  # the child writes its records as it exits
        if out.exists():
            break
        time.sleep(0.1)
    return json.loads(out.read_text())[-len(outcomes) :], outcomes


def totals(records: list[dict], outcomes: list) -> tuple[float, float, float]:
    """p50 ms of: the server's time minus forward, the client's added latency, forward."""
    p50 = statistics.median
    server_ms = p50([(r["out"] - r["in"] - r["forward"]) * 1000 for r in records])
    added = p50([(o.latency - o.forward) * 1000 for o in outcomes if o.status == 200])
    return server_ms, added, p50([r["forward"] * 1000 for r in records])


def drive(args) -> None:
    from loadtest.procs import cold_check

    records, outcomes = measure(args, dict(e.split("=", 1) for e in args.env))
    p50 = statistics.median
    print(f"| stage (p50, us) | {' '.join(args.env) or 'default settings'} |\n|---|---|")
    for name, a, b in STAGES:
        spent = [r[b] - r[a] - (r["forward"] if b == "ticked" else 0) for r in records]
        print(f"| {name} | {p50(spent) * 1e6:.0f} |")
    server_ms, added, forward = totals(records, outcomes)
    print(f"| server, bytes in to response written, minus forward (ms) | {server_ms:.2f} |")
    print(f"| **client: added latency p50 (ms)** | **{added:.2f}** |")
    print(f"| forward pass p50 (ms) | {forward:.2f} |")
    factor = cold_check(forward)
    print(f"| cold-cache factor after {forward:.0f} ms, this machine (`--cold`) | {factor:.2f} |")


def handrolled(kind: str, forward: float | str, seconds: float) -> float:
    """Client added latency p50 (ms) of loadtest/handrolled.py's `kind` server whose pass
    sleeps `forward` ms (or is the real network: "onnx"), driven like measure() drives
    fewstep."""
    from loadtest.procs import Processes, free_port
    from loadtest.rawclient import raw_sequential

    port = free_port()
    script = str(ROOT / "loadtest" / "handrolled.py")
    cmd = [sys.executable, script, kind, str(port), str(forward)]
    bodies = lone_requests()
    with Processes([cmd], port, {}, name=kind) as server:
        raw_sequential(server.url, bodies, 1.0)  # warm
        outcomes = raw_sequential(server.url, bodies, seconds)
    return statistics.median([(o.latency - o.forward) * 1000 for o in outcomes if o.status == 200])


def idle(args) -> None:
    """The same requests on the simulated runtime with flat curves: a forward pass that
    only sleeps for each of args.idle milliseconds, whatever the batch; "onnx" is the real
    network on ONNX Runtime instead. The service's work per request is the same in every
    row; only the pass changes. Beside it, in the same run, three servers that are not
    fewstep with the same pass (loadtest/handrolled.py): a hand-rolled FastAPI endpoint, a
    bare ASGI app on uvicorn (fewstep's HTTP server alone) and the stdlib asyncio floor;
    all added latencies are the client's p50 in ms."""
    print(
        "| forward pass, ms | fewstep: server, bytes in to response written, minus "
        "forward, ms | **fewstep: client added latency p50, ms** | hand-rolled FastAPI | bare "
        "ASGI app on uvicorn | stdlib asyncio floor | fewstep / FastAPI | fewstep minus bare "
        "ASGI, ms |\n|---|---|---|---|---|---|---|---|"
    )
    folder = Path(tempfile.mkdtemp())
    for ms in args.idle:  # milliseconds of sleep, or "onnx" (the real network)
        if ms == "onnx":
            env, kind = {"FEWSTEP_RUNTIME": "onnxruntime"}, "ONNX Runtime, "
        else:
            curve = folder / f"flat-{ms:g}.yaml"
            seconds = ms / 1000
            curve.write_text(
                f"device: flat {ms:g} ms (loadtest/stages.py --idle)\nmodel: fashion-edm\n"
                f"seconds:\n  1: {seconds}\n  1024: {seconds}\n"
            )
            env = {"FEWSTEP_RUNTIME": "simulated", "FEWSTEP_LATENCY_CURVE": str(curve)}
            kind = "a sleep, "
        server_ms, added, forward = totals(*measure(args, env))
        fastapi = handrolled("fastapi", ms, args.seconds)
        bare = handrolled("asgi", ms, args.seconds)
        floor = handrolled("floor", ms, args.seconds)
        print(
            f"| {kind}{forward:.2f} | {server_ms:.2f} | **{added:.2f}** | {fastapi:.2f} "
            f"| {bare:.2f} | {floor:.2f} | {added / fastapi:.2f} | {added - bare:.2f} |",
            flush=True,
        )


def cold(args) -> None:
    """The machine alone, no server: a small piece of JSON work right after this thread
    spun for each length (procs.cold_curve). Spinning keeps the vCPU running and touches
    almost nothing, so where the work still slows with the length, the caches were used by
    someone else meanwhile: on such a machine no service's path at concurrency 1 runs
    after a long forward pass as fast as it runs back to back."""
    from loadtest.procs import cold_curve

    waits = [0.0, *args.cold]
    times = cold_curve(waits, rounds=200)
    print("| spun before it, ms | the same JSON work, us (p50) | / back to back |\n|---|---|---|")
    for wait, us in zip(waits, times, strict=True):
        print(f"| {wait:g} | {us:.1f} | {us / times[0]:.2f} |")


def _lengths(value: str) -> list[float]:
    """--cold's MS,MS,...: positive milliseconds."""
    try:
        lengths = [float(x) for x in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MS,MS,... (numbers), got {value!r}") from None
    if not all(0 < ms < 60_000 for ms in lengths):
        raise argparse.ArgumentTypeError(f"each length must be over 0 and under 60000 ms: {value}")
    return lengths


def _passes(value: str) -> list[float | str]:
    """--idle's MS,...: positive milliseconds, or `onnx` for the real network."""
    passes: list[float | str] = []
    for word in value.split(","):
        try:
            passes += ["onnx"] if word == "onnx" else _lengths(word)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"expected MS,MS,... (milliseconds over 0 and under 60000, or onnx), got {value!r}"
            ) from None
    return passes


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    parser.add_argument(
        "--idle",
        type=_passes,
        default=None,
        help="MS,MS,...: instead of the stage table, the added latency with a forward pass "
        "that only sleeps this long (simulated runtime, flat curve), one row each; `onnx` "
        "for a row with the real network on ONNX Runtime",
    )
    parser.add_argument(
        "--cold",
        type=_lengths,
        default=None,
        help="MS,MS,...: no server; how much slower a small piece of work runs right after "
        "this thread spun for each length than back to back (the machine's own cold-cache "
        "curve), one row each",
    )
    args = parser.parse_args()
    if args.cold:
        cold(args)
    elif args.idle:
        idle(args)
    else:
        drive(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
