"""Serving under overload and at GPU speed, measured with the `simulated` runtime:

    .venv/bin/python loadtest/sweep.py [--parts overload,batching,cpu,apis] [--seconds 6]

Every server runs fashion-edm on the `simulated` runtime (measurement only: each forward
sleeps for a batch-latency curve and returns zeros), so the "device" takes no CPU from
the load generator and the server's Python on this machine's shared cores. Parts:

- overload: the mixed scenario (loadtest/scenarios/mixed-edm.yaml) on this machine's ONNX
  Runtime CPU curve (loadtest/curves/cpu-onnx-fashion-edm.yaml, a device-bound server),
  open-loop Poisson arrivals from 0.25x to 2x capacity (capacity: closed-loop throughput
  with --concurrency clients), one fresh server per admission policy: admission by
  predicted wait (--target-s) and the queued-samples bound alone (the old behaviour). One
  markdown table per server: throughput, p50/p99 of answered requests, 429 share, goodput
  (answered within --slo-s) and the requests answered. Goals at 2x: throughput >= 0.95x
  peak, p99 <= 2x p99 at 0.5x. Its points last --overload-seconds (30): at 0.5x this curve
  answers about 4 req/s, and a p99 needs some hundred requests (over 8 s it is about the
  slowest of 30, and the ratio moved between 1.75 and 2.32 from run to run).
- batching: the H200 curve (default of the simulated runtime; --batching-curve for another),
  each mode's closed-loop capacity, then the mixed scenario open loop at --load (0.8) of the
  smaller of the two, continuous vs static batching, each on a fresh server (goal:
  continuous p99 <= 0.6x static at equal throughput). Static batching can sustain less
  open loop than closed (arrivals spread out make smaller batches of more groups), and a
  shared VM can slow between the capacity run and this one: where either server falls
  behind (`keeps_up`: answers under 0.95 of the offered rate, or its latency grows over the
  run), the rate drops by a fifth and both run again (up to three times), so the ratio is
  taken where both keep up.
- cpu: H200 curve, saturation (n=8, dpmpp_2m, 4 steps, closed loop): samples/s and the
  service's CPU seconds per sample (all its processes), embedded vs Redis (1 API + 1 worker)
  (goal: about 10,000 samples/s per core, what one H200 takes at this curve), and the same
  per core of the worker process alone: over Redis that is the process beside the GPU,
  while API processes can run on other machines.
- latency: H200 curve, concurrency 1 (n=1, euler, 1 step): client latency minus forward
  time, embedded and Redis (goal p50 <= 1 ms, p99 <= 5 ms).
- apis: H200 curve, Redis, 1 worker and 1, 2, 3 API processes (`fewstep serve
  --no-worker`), clients spread over them: samples/s vs API processes.
Progress goes to stderr, tables to stdout. Ratios are measured side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
import uuid
from pathlib import Path

import httpx
import redis
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.procs import Processes, fewstep, free_port, machine_check  # noqa: E402
from loadtest.rawclient import raw_closed, raw_ping, raw_sequential  # noqa: E402
from loadtest.run import Outcome, Scenario, client_for, percentile, send  # noqa: E402

CPU_CURVE = ROOT / "loadtest/curves/cpu-onnx-fashion-edm.yaml"
OFF = "1e9"  # a predicted-wait target nothing exceeds: the samples bound alone


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Deployment(contextlib.ExitStack):
    """fewstep on the simulated runtime: embedded, or APIs + workers over Redis."""

    def __init__(
        self,
        curve: Path | None,
        batching="continuous",
        queue="memory",
        apis=1,
        workers=1,
        env=None,
        prefix="",
        root: Path = ROOT,
    ) -> None:
        super().__init__()
        self.root = root
        self.args = ["--runtime", "simulated", "--batching", batching]
        if curve is not None:
            self.args += ["--latency-curve", str(curve)]
        self.queue, self.apis, self.workers = queue, apis, workers
        self.env = {"FEWSTEP_MODELS": '["fashion-edm"]'}
        if prefix:
            self.env["FEWSTEP_REDIS_PREFIX"] = prefix
        self.env.update(env or {})
        self.procs: list[Processes] = []

    def _api(self, with_workers: int) -> Processes:
        port = free_port()
        serve = fewstep("serve", "--host", "127.0.0.1", "--port", str(port), "--no-grpc")
        serve += self.args
        commands = [serve]
        if self.queue != "memory":
            serve += ["--queue", self.queue, "--no-worker"]
            commands += [fewstep("worker", "--queue", self.queue, *self.args)] * with_workers
        return Processes(commands, port, self.env, root=self.root)

    def __enter__(self) -> Deployment:
        super().__enter__()
        for i in range(self.apis):
            self.procs.append(self.enter_context(self._api(self.workers if i == 0 else 0)))
        return self

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.procs]

    def cpu_seconds(self) -> float:
        return sum(p.cpu_seconds() for p in self.procs)

    def worker_cpu_seconds(self) -> float:
        """CPU time of the processes that run the forward passes: the workers over Redis
        (the first API process starts them), the one server embedded."""
        return self.procs[0].cpu_seconds(first=0 if self.queue == "memory" else 1)

    def wakeups(self) -> int:
        return sum(p.wakeups() for p in self.procs)


async def closed(urls: list[str], bodies: list[dict], concurrency: int, seconds: float):
    """`concurrency` clients back to back, spread over `urls`: (elapsed, outcomes)."""
    outcomes: list[Outcome] = []
    stop = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def loop(client):
        while time.perf_counter() < stop:
            outcomes.append(await send(client, bodies[next(counter) % len(bodies)]))

    clients = [client_for(u) for u in urls]
    begin = time.perf_counter()
    await asyncio.gather(*(loop(clients[i % len(clients)]) for i in range(concurrency)))
    elapsed = time.perf_counter() - begin
    for c in clients:
        await c.aclose()
    return elapsed, outcomes


async def poisson(urls: list[str], bodies: list[dict], rate: float, seconds: float, seed: int):
    """Poisson arrivals at `rate` req/s for `seconds`, whatever the responses do."""
    rng, arrivals, t = random.Random(seed), [], 0.0
    while (t := t + rng.expovariate(rate)) < seconds:
        arrivals.append(t)
    clients = [client_for(u) for u in urls]
    begin, tasks = time.perf_counter(), []
    for i, at in enumerate(arrivals):
        delay = begin + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(clients[i % len(clients)], bodies[i % len(bodies)])))
    outcomes = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - begin
    for c in clients:
        await c.aclose()
    return elapsed, list(outcomes)


def ok_ms(outcomes: list[Outcome]) -> list[float]:
    return [o.latency * 1000 for o in outcomes if o.status == 200]


def keeps_up(elapsed: float, outcomes: list[Outcome], rate: float) -> bool:
    """Whether a server kept up with an open-loop `rate`: it answered at least 0.95 of it,
    and its queue did not grow over the run (the median latency of the last third of the
    requests, in arrival order, at most twice the first third's plus 5 ms). A server at the
    edge of its capacity answers almost every request, late; the second test catches it."""
    lat = ok_ms(outcomes)
    if len(lat) / elapsed < 0.95 * rate:
        return False
    third = len(lat) // 3
    if third < 10:
        return True
    return percentile(lat[-third:], 50) <= 2 * percentile(lat[:third], 50) + 5


def capacity(urls: list[str], bodies: list[dict], concurrency: int, seconds: float) -> float:
    elapsed, out = asyncio.run(closed(urls, bodies, concurrency, seconds))
    return sum(o.status == 200 for o in out) / elapsed


# -- parts ---------------------------------------------------------------------------------


def overload(args, bodies: list[dict]) -> None:
    policies = {
        f"admission by predicted wait (target {args.target_s:g} s)": str(args.target_s),
        "queued-samples bound only (1024)": OFF,
    }
    for name, target in policies.items():
        env = {"FEWSTEP_MAX_PREDICTED_WAIT_S": target}
        with Deployment(CPU_CURVE, env=env) as d:
            say(f"overload / {name}: capacity ...")
            cap = capacity(d.urls, bodies, args.concurrency, args.seconds)
            rows = []
            seconds = args.overload_seconds
            for load in args.loads:
                say(f"overload / {name}: {load:g}x = {load * cap:.1f} req/s ...")
                elapsed, out = asyncio.run(
                    poisson(d.urls, bodies, load * cap, seconds, args.seed + int(load * 100))
                )
                rows.append((load, load * cap, elapsed, out))
        print(
            f"\n### {name}: mixed-edm, simulated CPU-ONNX curve, capacity {cap:.1f} req/s, "
            f"{seconds:g} s per point\n"
        )
        print(
            "| load | offered req/s | answered req/s | samples/s | p50 ms | p99 ms | 429 | "
            f"goodput req/s (<= {args.slo_s:g} s) | answered |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        stats = {}
        for load, rate, elapsed, out in rows:
            lat = ok_ms(out)
            thr = len(lat) / elapsed
            good = sum(x <= args.slo_s * 1000 for x in lat) / elapsed
            rejected = sum(o.status == 429 for o in out) / max(len(out), 1)
            samples = sum(o.samples for o in out) / elapsed
            stats[load] = (thr, percentile(lat, 99))
            print(
                f"| {load:g}x | {rate:.1f} | {thr:.1f} | {samples:.1f} | "
                f"{percentile(lat, 50):.0f} | {percentile(lat, 99):.0f} | {rejected:.0%} | "
                f"{good:.1f} | {len(lat)} |"
            )
        peak = max(t for t, _ in stats.values())
        top, half = max(stats), stats.get(0.5)
        line = f"\nat {top:g}x: throughput {stats[top][0] / peak:.2f} of peak (goal >= 0.95)"
        if half:
            line += f", p99 {stats[top][1] / half[1]:.2f}x the p99 at 0.5x (goal <= 2)"
        print(line)


def batching(args, bodies: list[dict]) -> None:
    curve_name = "the H200 curve"
    if args.batching_curve is not None:
        curve_name = f"the curve {args.batching_curve.name}"
    caps = {}
    for mode in ("continuous", "static"):
        with Deployment(args.batching_curve, batching=mode) as d:
            say(f"batching: capacity of {mode} batching on {curve_name} ...")
            caps[mode] = capacity(d.urls, bodies, args.concurrency, args.seconds)
    # the smaller capacity, lowered until both keep up (keeps_up): else the comparison is
    # of a server that keeps up against one whose queue grows without end
    rate = first = args.load * min(caps.values())
    for attempt in range(4):
        results = {}
        for tree, root in trees(args):
            for mode in ("continuous", "static"):
                with Deployment(args.batching_curve, batching=mode, root=root) as d:
                    say(f"batching: {label(mode, tree)} at {rate:.0f} req/s ...")
                    out = asyncio.run(poisson(d.urls, bodies, rate, args.seconds, args.seed))
                    results.setdefault(tree, []).append((mode, out))
        measured = [run for r in results.values() for _, run in r]
        kept_up = all(keeps_up(elapsed, out, rate) for elapsed, out in measured)
        if kept_up or attempt == 3:
            break
        say(f"batching: a server fell behind {rate:.0f} req/s; again at {0.8 * rate:.0f}")
        rate *= 0.8
    where = f"{args.load:.0%} of the smaller capacity = {rate:.0f} req/s"
    if rate != first:
        where = f"{rate:.0f} req/s ({args.load:.0%} of the smaller capacity, {first:.0f}, was "
        where += "more than a server sustained open loop)"
    print(
        f"\n### Continuous vs static batching, mixed-edm, simulated runtime on {curve_name}, "
        f"open loop at {where}\n\n"
        f"Capacity (closed loop, {args.concurrency} clients): continuous "
        f"{caps['continuous']:.0f} req/s, static {caps['static']:.0f} req/s "
        f"({caps['continuous'] / caps['static']:.2f}x).\n"
    )
    print(
        "| batching | answered req/s | p50 ms | p95 ms | p99 ms | 429 |\n|---|---|---|---|---|---|"
    )
    for tree, runs in results.items():
        p99: dict[str, list[float]] = {}
        thr: dict[str, list[float]] = {}
        for mode, (elapsed, out) in runs:
            lat = ok_ms(out)
            thr.setdefault(mode, []).append(len(lat) / elapsed)
            p99.setdefault(mode, []).append(percentile(lat, 99))
            rejected = sum(o.status == 429 for o in out) / max(len(out), 1)
            print(
                f"| {label(mode, tree)} | {thr[mode][-1]:.0f} | {percentile(lat, 50):.1f} | "
                f"{percentile(lat, 95):.1f} | {p99[mode][-1]:.1f} | {rejected:.0%} |"
            )
        ratio = [c / s for c, s in zip(p99["continuous"], p99["static"], strict=True)]
        through = [c / s for c, s in zip(thr["continuous"], thr["static"], strict=True)]
        print(
            f"\n{label('continuous p99 / static p99', tree)} = "
            f"{', '.join(f'{r:.2f}' for r in ratio)} (goal <= 0.6), throughput ratio "
            f"{', '.join(f'{t:.2f}' for t in through)}"
        )


def trees(args) -> list[tuple[str, Path]]:
    """(label, checkout) of this tree and, with --baseline, the baseline, measured in
    alternating rounds so both see the same machine."""
    if args.baseline is None:
        return [("", ROOT)]
    return [("this tree", ROOT), ("baseline", args.baseline)] * args.rounds


def label(name: str, tree: str) -> str:
    return f"{name}, {tree}" if tree else name


def cpu(args, heavy: list[dict]) -> None:
    print(
        "\n### Service CPU per sample at saturation, simulated H200 curve (n=8, dpmpp_2m, "
        f"4 steps, {args.concurrency} clients closed loop, {args.client} client)\n"
    )
    print(
        "| deployment | samples/s | service CPU ms / sample | samples/s per core | "
        "worker process: samples/s per core | requests per forward pass | "
        "load generator cores |\n|---|---|---|---|---|---|---|"
    )
    per_core: dict[tuple[str, str], list[float]] = {}
    for name, queue in (("embedded", "memory"), ("Redis: 1 API + 1 worker", args.redis)):
        for tree, root in trees(args):
            prefix = f"fewstep-sweep-{uuid.uuid4().hex[:8]}:"
            try:
                with Deployment(None, queue=queue, prefix=prefix, root=root) as d:
                    say(f"cpu: {label(name, tree)} ...")
                    asyncio.run(closed(d.urls, heavy, 4, 1.0))  # warm
                    passes = batch_requests(d.urls[0])
                    before, client = d.cpu_seconds(), time.process_time()
                    worker = d.worker_cpu_seconds()
                    load = raw_closed if args.client == "raw" else closed
                    elapsed, out = asyncio.run(load(d.urls, heavy, args.concurrency, args.seconds))
                    used, client = d.cpu_seconds() - before, time.process_time() - client
                    worker = d.worker_cpu_seconds() - worker
                    passes = [b - a for a, b in zip(passes, batch_requests(d.urls[0]), strict=True)]
            finally:
                drop(args.redis, prefix)
            samples = sum(o.samples for o in out)
            per = used / max(samples, 1)
            per_core.setdefault((name, tree), []).append(1 / per)
            # the worker's passes are counted where it runs: not in a Redis API process
            shared = f"{passes[1] / passes[0]:.1f}" if passes[0] else "-"
            print(
                f"| {label(name, tree)} | {samples / elapsed:.0f} | {per * 1000:.3f} | "
                f"{1 / per:.0f} | {max(samples, 1) / max(worker, 1e-9):.0f} | {shared} | "
                f"{client / elapsed:.2f} |",
                flush=True,
            )
    _ratios(per_core, "samples/s per core")
    print(
        "\ngoal: about 10,000 samples/s per core (what one H200 takes at this curve); over "
        "Redis the worker process is the one beside the GPU"
    )


def batch_requests(url: str) -> tuple[float, float]:
    """(forward passes, requests summed over them) from the server's /metrics so far."""
    count = total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("fewstep_batch_requests_count"):
            count += float(line.rsplit(" ", 1)[1])
        elif line.startswith("fewstep_batch_requests_sum"):
            total += float(line.rsplit(" ", 1)[1])
    return count, total


def _ratios(values: dict[tuple[str, str], list[float]], what: str) -> None:
    """this tree / baseline of the medians, per deployment (with --baseline)."""
    for name in dict.fromkeys(n for n, _ in values):
        if (name, "baseline") in values:
            new = percentile(values[name, "this tree"], 50)
            old = percentile(values[name, "baseline"], 50)
            print(f"\n{name}: {what}, this tree / baseline (medians of rounds) = {new / old:.2f}")


def apis(args, heavy: list[dict]) -> None:
    print(
        "\n### Throughput vs API processes, Redis, 1 worker, simulated H200 curve (n=8, "
        f"dpmpp_2m, 4 steps, {args.concurrency} clients spread over the APIs)\n"
    )
    print("| API processes | samples/s | service CPU ms / sample |\n|---|---|---|")
    for count in args.api_counts:
        prefix = f"fewstep-sweep-{uuid.uuid4().hex[:8]}:"
        try:
            with Deployment(None, queue=args.redis, apis=count, prefix=prefix) as d:
                say(f"apis: {count} ...")
                asyncio.run(closed(d.urls, heavy, 4, 1.0))
                before = d.cpu_seconds()
                elapsed, out = asyncio.run(closed(d.urls, heavy, args.concurrency, args.seconds))
                used = d.cpu_seconds() - before
        finally:
            drop(args.redis, prefix)
        samples = sum(o.samples for o in out)
        print(f"| {count} | {samples / elapsed:.0f} | {used / max(samples, 1) * 1000:.3f} |")


def latency(args, bodies: list[dict]) -> None:
    single = [
        {k: v for k, v in dict(b, n=1, steps=1, sampler="euler").items() if k != "teleport"}
        for b in bodies[:500]
    ]
    print(
        "\n### Latency added at concurrency 1 (n=1, euler, 1 step), simulated H200 curve: "
        "client latency minus forward time\n\n"
        "A raw keep-alive socket client (what the server and loopback add); the httpx "
        "column is the same with the Python client most load generators use.\n"
    )
    print(
        "| deployment | requests | p50 ms | p95 ms | p99 ms | httpx p50 / p99 ms | "
        "server CPU ms / request | server wake-ups / request | GET /healthz p50 / p99 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    medians: dict[tuple[str, str], list[float]] = {}
    for name, queue in (("embedded", "memory"), ("Redis: 1 API + 1 worker", args.redis)):
        for tree, root in trees(args):
            prefix = f"fewstep-sweep-{uuid.uuid4().hex[:8]}:"
            try:
                with Deployment(None, queue=queue, prefix=prefix, root=root) as d:
                    say(f"latency: {label(name, tree)} ...")
                    raw_sequential(d.urls[0], single, 1.0)
                    before, woken = d.cpu_seconds(), d.wakeups()
                    out = raw_sequential(d.urls[0], single, args.seconds)
                    used, woken = d.cpu_seconds() - before, d.wakeups() - woken
                    _, slow = asyncio.run(closed(d.urls, single, 1, min(args.seconds, 3.0)))
                    floor = raw_ping(d.urls[0])
            finally:
                drop(args.redis, prefix)
            added = [(o.latency - o.forward) * 1000 for o in out if o.status == 200]
            with_httpx = [(o.latency - o.forward) * 1000 for o in slow if o.status == 200]
            medians.setdefault((name, tree), []).append(percentile(added, 50))
            print(
                f"| {label(name, tree)} | {len(added)} | {percentile(added, 50):.2f} | "
                f"{percentile(added, 95):.2f} | {percentile(added, 99):.2f} | "
                f"{percentile(with_httpx, 50):.2f} / {percentile(with_httpx, 99):.2f} | "
                f"{used * 1000 / max(len(out), 1):.2f} | {woken / max(len(out), 1):.1f} | "
                f"{percentile(floor, 50):.2f} / {percentile(floor, 99):.2f} |",
                flush=True,
            )
    _ratios(medians, "added p50")
    print("\ngoal: p50 <= 1 ms, p99 <= 5 ms")


def drop(url: str, prefix: str) -> None:
    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)


def main() -> int:
    uvloop.install()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="overload,batching,cpu,apis,latency")
    parser.add_argument("--scenario", type=Path, default=ROOT / "loadtest/scenarios/mixed-edm.yaml")
    parser.add_argument("--seconds", type=float, default=6.0, help="per load point")
    parser.add_argument(
        "--overload-seconds",
        type=float,
        default=30.0,
        help="overload part, per load point: long enough for a p99 at 0.5x capacity",
    )
    parser.add_argument("--loads", default="0.25,0.5,0.75,1,1.5,2", help="x capacity")
    parser.add_argument("--target-s", type=float, default=0.5, help="predicted-wait target")
    parser.add_argument("--slo-s", type=float, default=2.0, help="goodput latency target")
    parser.add_argument("--load", type=float, default=0.8, help="batching: share of capacity")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    parser.add_argument(
        "--batching-curve",
        type=Path,
        default=None,
        help="batching part: the simulated runtime's latency curve (default: the H200 one)",
    )
    parser.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="cpu part's load generator: asyncio sockets (default; little CPU of its own) or "
        "httpx (about a core for 32 clients here, so the server's batches stay small)",
    )
    parser.add_argument("--api-counts", default="1,2,3")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="batching, cpu and latency parts: also measure this checkout (e.g. `git worktree add "
        "/tmp/base main`), in alternating rounds, and print this tree / baseline",
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds per tree with --baseline")
    args = parser.parse_args()
    args.loads = [float(x) for x in args.loads.split(",")]
    args.api_counts = [int(x) for x in args.api_counts.split(",")]

    from engines.repository import Repository

    scenario = Scenario.load(args.scenario)
    labels = list(Repository(ROOT / "model_repo").spec(scenario.model).labels)
    bodies = scenario.bodies(5000, labels, args.seed)
    heavy = [dict(b, n=8, sampler="dpmpp_2m", steps=4) for b in bodies[:400]]
    print(
        f"# fewstep sweep: {os.cpu_count()} CPUs, {args.seconds:g} s per point, "
        "runtime `simulated` (measurement only)"
    )
    print(
        f"\nmachine check: {machine_check():.1f} ms for a fixed Python workload "
        "(`loadtest/procs.py`; lower is faster): compare runs only where this is close"
    )
    parts = {
        "overload": (overload, bodies),
        "batching": (batching, bodies),
        "cpu": (cpu, heavy),
        "apis": (apis, heavy),
        "latency": (latency, bodies),
    }
    for part in args.parts.split(","):
        fn, data = parts[part]
        fn(args, data)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
