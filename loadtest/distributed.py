"""Distributed mode vs embedded, side by side on this machine, one run:

    .venv/bin/python loadtest/distributed.py [--seconds 10] [--rounds 3] [--workers 2]

Two deployments of the same model (fashion-gaussian) run at once on loopback:
- embedded: `fewstep serve` (in-process queue and worker);
- distributed: `fewstep serve --queue redis://127.0.0.1:6379/0 --no-worker` plus
  `--workers` x `fewstep worker` on the same Redis (a fresh key prefix, deleted after).
It measures, alternating between the two in rounds so that background load hits both alike:
1. concurrency 1 (n=1, euler, 1 step, the scenario's prompts): client latency minus forward
   time; the difference of the medians is what the Redis hop adds (goal p50 <= 1 ms);
2. saturation (uniform8: n=8, dpmpp_2m, 8 steps, `--concurrency` clients, closed loop):
   samples per second, and the CPU seconds per sample of each deployment's processes.
It prints markdown tables. Every process, Redis and the load generator share this machine's
cores; the note under the tables says how many.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from pathlib import Path

import redis
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.procs import Processes, fewstep, free_port  # noqa: E402
from loadtest.run import HEADER, Scenario, closed_loop, percentile, row  # noqa: E402


def Deployment(name: str, model: str, queue: str, workers: int, prefix: str) -> Processes:
    """One API process (and its worker processes, if any), started and stopped together."""
    port = free_port()
    serve = fewstep("serve", "--host", "127.0.0.1", "--port", str(port), "--no-grpc")
    if queue != "memory":
        serve += ["--queue", queue, "--no-worker"]
    worker = fewstep("worker", "--queue", queue)
    env = {"FEWSTEP_MODELS": f'["{model}"]', "FEWSTEP_REDIS_PREFIX": prefix}
    return Processes([serve] + [worker] * workers, port, env, name=name)


def warm(url: str, bodies: list[dict]) -> None:
    """A few requests first, so every worker has compiled and cached what it needs."""
    asyncio.run(closed_loop(url, bodies, 4, 1.0))


def main() -> int:
    uvloop.install()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", type=Path, default=ROOT / "loadtest/scenarios/mixed.yaml")
    parser.add_argument(
        "--saturation", type=Path, default=ROOT / "loadtest/scenarios/uniform8.yaml"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--concurrency", type=int, default=32, help="clients at saturation")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    mixed, saturation = Scenario.load(args.scenario), Scenario.load(args.saturation)
    from engines.repository import Repository

    labels = list(Repository(ROOT / "model_repo").load(mixed.model).spec.labels)
    single = [dict(b, n=1, steps=1, sampler="euler") for b in mixed.bodies(400, labels, args.seed)]
    heavy = saturation.bodies(400, labels, args.seed + 1)
    prefix = f"fewstep-bench-{uuid.uuid4().hex[:12]}:"
    names = ("embedded", f"distributed (1 API + {args.workers} workers)")
    latency = {n: [] for n in names}
    sat = {n: [] for n in names}
    cpu = {n: [0.0, 0] for n in names}
    try:
        with (
            Deployment(names[0], mixed.model, "memory", 0, prefix) as embedded,
            Deployment(names[1], mixed.model, args.redis, args.workers, prefix) as dist,
        ):
            deployments = (embedded, dist)
            for d in deployments:
                warm(d.url, heavy)
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
                for d in deployments if r % 2 == 0 else deployments[::-1]:
                    _, out = asyncio.run(closed_loop(d.url, single, 1, args.seconds))
                    latency[d.name] += out
                for d in deployments if r % 2 == 0 else deployments[::-1]:
                    before = d.cpu_seconds()
                    rate, out = asyncio.run(
                        closed_loop(d.url, heavy, args.concurrency, args.seconds)
                    )
                    sat[d.name].append((rate, out))
                    cpu[d.name][0] += d.cpu_seconds() - before
                    cpu[d.name][1] += sum(o.samples for o in out)
    finally:
        client = redis.Redis.from_url(args.redis)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)

    print(f"# fewstep distributed mode vs embedded: {mixed.model}, {os.cpu_count()} CPUs\n")
    print(
        f"## Concurrency 1 (n=1, euler, 1 step), {args.rounds} x {args.seconds:.0f} s each: "
        "client latency minus forward time\n"
    )
    print("| deployment | requests | p50 ms | p95 ms | p99 ms |\n|---|---|---|---|---|")
    added = {}
    for name in names:
        ms = [(o.latency - o.forward) * 1000 for o in latency[name] if o.status == 200]
        added[name] = percentile(ms, 50)
        print(
            f"| {name} | {len(ms)} | {percentile(ms, 50):.2f} | {percentile(ms, 95):.2f} | "
            f"{percentile(ms, 99):.2f} |"
        )
    print(f"\nthe Redis hop adds p50 {added[names[1]] - added[names[0]]:.2f} ms (goal <= 1 ms)\n")
    print(
        f"## Saturation ({saturation.name}: n=8, dpmpp_2m, 8 steps), {args.concurrency} "
        f"clients, closed loop, {args.rounds} x {args.seconds:.0f} s\n"
    )
    print(HEADER)
    rates = {}
    for name in names:
        outs = [o for _, out in sat[name] for o in out]
        rates[name] = sum(rate for rate, _ in sat[name]) / len(sat[name])
        print(row(name, rates[name], outs))
    print(
        f"\ndistributed / embedded throughput = {rates[names[1]] / rates[names[0]]:.2f}; CPU ms "
        f"per sample (all of a deployment's processes): embedded "
        f"{1000 * cpu[names[0]][0] / max(cpu[names[0]][1], 1):.3f}, distributed "
        f"{1000 * cpu[names[1]][0] / max(cpu[names[1]][1], 1):.3f}"
    )
    load = os.getloadavg()
    print(
        f"\nOne machine, {os.cpu_count()} cores, shared by the load generator, Redis, the "
        f"embedded server and the distributed API and workers (load average at the end: "
        f"{load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f})."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
