"""Quality "auto" under overload: served within deadline, steps chosen, FD of what was served.

    .venv/bin/python loadtest/auto_quality.py [--model fashion-cd] [--load 2.0]
        [--seconds 30] [--deadline-ms 1000] [--n 4]

One model on this machine's CPU (its shipped runtime), one fresh `fewstep serve` per
policy. Capacity is the closed-loop throughput of fixed requests at the top of the model's
quality_steps (--concurrency clients). Then open-loop Poisson arrivals at --load x that
capacity for --seconds, every request with the same deadline (--deadline-ms), classes
cycling over the labels:

- fixed: `steps` = the top budget; admission by predicted wait refuses (429) what cannot
  meet the deadline or waits past the model's target;
- auto, greedy (`FEWSTEP_AUTO_QUALITY=greedy`): `quality: "auto"`; admission picks the most
  steps whose predicted finish meets the deadline at the current load;
- auto, graded (the default): the same, keeping headroom for the larger budgets (the i-th
  of m must finish within (i+1)/m of the deadline).

Per policy: requests, share served within the deadline, 429 share, mean steps of what was
served, p50/p99 latency of what was served, images/s, and the FD and class accuracy of the
served images against the Fashion-MNIST test set (engines/quality.py, the shipped
classifier), with the offline FD of the model at each budget at the same n for reference.
Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
import uvloop
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engines import quality  # noqa: E402
from engines.media import to_uint8  # noqa: E402
from engines.repository import Repository  # noqa: E402
from loadtest.procs import Processes, fewstep, free_port  # noqa: E402
from loadtest.run import client_for, percentile  # noqa: E402


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Served:
    latency: float
    status: int
    steps: int = 0
    labels: list[int] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)


async def send(client: httpx.AsyncClient, body: dict, label: int) -> Served:
    begin = time.perf_counter()
    try:
        r = await client.post("/v1/images/generations", json=body)
    except httpx.TransportError:
        return Served(time.perf_counter() - begin, 0)
    latency = time.perf_counter() - begin
    if r.status_code != 200:
        return Served(latency, r.status_code)
    data = r.json()
    pngs = [base64.b64decode(d["b64_json"]) for d in data["data"]]
    return Served(latency, 200, data["steps"], [label] * len(pngs), pngs)


def server(model: str, env: dict[str, str]) -> Processes:
    port = free_port()
    cmd = fewstep("serve", "--host", "127.0.0.1", "--port", str(port), "--no-grpc")
    return Processes([cmd], port, {"FEWSTEP_MODELS": f'["{model}"]', **env})


def bodies(spec, base: dict, count: int) -> list[tuple[dict, int]]:
    out = []
    for i in range(count):
        label = i % len(spec.labels)
        out.append(({**base, "prompt": spec.labels[label], "seed": i}, label))
    return out


async def closed(url: str, work: list[tuple[dict, int]], concurrency: int, seconds: float):
    served: list[Served] = []
    stop, counter = time.perf_counter() + seconds, iter(range(10**9))

    async def loop(client):
        while time.perf_counter() < stop:
            body, label = work[next(counter) % len(work)]
            served.append(await send(client, body, label))

    async with client_for(url) as client:
        begin = time.perf_counter()
        await asyncio.gather(*(loop(client) for _ in range(concurrency)))
        return time.perf_counter() - begin, served


async def poisson(url: str, work: list[tuple[dict, int]], rate: float, seconds: float, seed: int):
    rng, arrivals, t = random.Random(seed), [], 0.0
    while (t := t + rng.expovariate(rate)) < seconds:
        arrivals.append(t)
    async with client_for(url) as client:
        begin, tasks = time.perf_counter(), []
        for i, at in enumerate(arrivals):
            delay = begin + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body, label = work[i % len(work)]
            tasks.append(asyncio.create_task(send(client, body, label)))
            if i % 200 == 0:
                say(f"    {i}/{len(arrivals)} requests sent")
        served = await asyncio.gather(*tasks)
        return time.perf_counter() - begin, list(served)


def to_tensor(pngs: list[bytes]) -> torch.Tensor:
    arrays = [np.asarray(Image.open(io.BytesIO(p)).convert("L"), dtype=np.float32) for p in pngs]
    x = torch.from_numpy(np.stack(arrays))[:, None] / 255.0
    return x * 2 - 1


def fd_and_accuracy(ref: quality.Reference, images: torch.Tensor, labels: torch.Tensor):
    feats, preds = quality.embed(ref.classifier, images)
    fd = quality.frechet_distance(quality.Gaussian.of(feats), ref.test)
    return fd, float((preds == labels).float().mean())


def quantized(images: torch.Tensor) -> torch.Tensor:
    """Float samples in [-1, 1] as the server's 8-bit PNGs decode (to_tensor): the server's
    own quantiser, engines.media.to_uint8."""
    return to_uint8(images, (-1.0, 1.0)).float() / 255.0 * 2 - 1


def mix_table(ref, folder: Path, spec, mixes: dict[str, dict[int, int]], seed: int) -> list[str]:
    """FD and class accuracy of each policy's served step mix at the pools' n: the first
    share of the largest budget's pool, the next share of the next budget's, and so on, so
    no two images share a seed (labels cycle over the classes as offline). A few hundred
    served images give FD a large positive bias; this is the same mix at n = 10,000."""
    pools = {}
    for steps in {b for mix in mixes.values() for b in mix}:
        found = folder.glob(f"{spec.name}-*-plain-1x{steps}-*-n*-seed{seed}.pt")
        largest = max(
            found, key=lambda p: int(p.stem.rsplit("-n", 1)[1].split("-")[0]), default=None
        )
        if largest is None:
            raise SystemExit(f"--pools: no plain:{steps} samples of {spec.name} in {folder}")
        data = torch.load(largest)
        pools[steps] = (quantized(data["images"]), data["labels"])
    n = min(len(images) for images, _ in pools.values())
    lines = [
        f"\nThe served step mix at n = {n} (offline samples from the same seeds' pools, "
        f"{folder}):\n",
        "| policy | share of images at each budget | FD | class accuracy |",
        "|---|---|---|---|",
    ]
    for name, mix in mixes.items():
        total = max(sum(mix.values()), 1)
        counts = {b: round(n * c / total) for b, c in mix.items()}
        counts[max(counts, key=counts.get)] += n - sum(counts.values())
        parts, labels, at = [], [], 0
        for steps, count in counts.items():
            parts.append(pools[steps][0][at : at + count])
            labels.append(pools[steps][1][at : at + count])
            at += count
        fd, acc = fd_and_accuracy(ref, torch.cat(parts), torch.cat(labels))
        shares = ", ".join(f"{b} steps {c / n:.0%}" for b, c in counts.items())
        lines.append(f"| {name} | {shares} | {fd:.3f} | {acc:.3f} |")
    return lines


def main() -> int:
    uvloop.install()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="fashion-cd")
    p.add_argument("--load", type=float, default=2.0, help="offered load / capacity (2.0)")
    p.add_argument("--seconds", type=float, default=30.0, help="open-loop time per policy")
    p.add_argument("--deadline-ms", type=int, default=1000)
    p.add_argument("--n", type=int, default=4, help="images per request (4)")
    p.add_argument("--concurrency", type=int, default=16, help="clients for capacity (16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pools",
        type=Path,
        default=None,
        help="samples of `fewstep bench scaling MODEL --cells plain:S,... --n N --samples-dir "
        "DIR` for every budget S: also the FD of each policy's served step mix at n = N",
    )
    args = p.parse_args()

    spec = Repository(ROOT / "model_repo").spec(args.model)
    ladder = spec.sampling.budgets(spec.sampling.default_sampler)
    base = {"model": args.model, "n": args.n, "deadline_ms": args.deadline_ms}
    auto = {**base, "quality": "auto"}
    policies = {
        f"fixed {ladder[0]} steps (429 when the deadline cannot be met)": (
            {**base, "steps": ladder[0]},
            {},
        ),
        f'quality "auto", greedy (steps from {list(ladder)})': (
            auto,
            {"FEWSTEP_AUTO_QUALITY": "greedy"},
        ),
        f'quality "auto", graded (the default; steps from {list(ladder)})': (auto, {}),
    }
    results = {}
    rate = None
    for name, (body, env) in policies.items():
        work = bodies(spec, body, 1000)
        plain = bodies(spec, {"model": args.model, "n": args.n, "steps": ladder[0]}, 1000)
        with server(args.model, env) as server_:
            say(f"{name}: warming up")
            asyncio.run(closed(server_.url, plain, 4, 3.0))
            if rate is None:
                say(f"  capacity: closed loop, {args.concurrency} clients, fixed {ladder[0]} steps")
                elapsed, out = asyncio.run(closed(server_.url, plain, args.concurrency, 10.0))
                capacity = sum(s.status == 200 for s in out) / elapsed
                rate = args.load * capacity
                say(f"  capacity {capacity:.1f} req/s; offering {rate:.1f} req/s")
            say(f"  open loop {rate:.1f} req/s for {args.seconds:g} s")
            elapsed, served = asyncio.run(poisson(server_.url, work, rate, args.seconds, args.seed))
        results[name] = (elapsed, served)

    say("quality: loading the classifier and the test set")
    ref = quality.Reference(quality.load_classifier(ROOT / quality.CLASSIFIER))
    lines = [
        f'\n### Quality "auto" under {args.load:g}x overload: {args.model}, n={args.n} per '
        f"request, deadline {args.deadline_ms} ms, {rate:.1f} req/s offered for "
        f"{args.seconds:g} s (capacity {rate / args.load:.1f} req/s at {ladder[0]} steps)\n",
        "| policy | requests | served within deadline | 429 | other errors | mean steps "
        "served | p50 / p99 ms (served) | images/s | FD of served (n) | class accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    served_n, mixes = [], {}
    for name, (elapsed, served) in results.items():
        ok = [s for s in served if s.status == 200]
        in_time = sum(s.latency * 1000 <= args.deadline_ms for s in ok)
        images = [png for s in ok for png in s.images]
        labels = torch.tensor([label for s in ok for label in s.labels])
        fd, acc = fd_and_accuracy(ref, to_tensor(images), labels) if images else (float("nan"),) * 2
        served_n.append(len(images))
        steps = sum(s.steps for s in ok) / max(len(ok), 1)
        mixes[name] = {b: sum(len(s.images) for s in ok if s.steps == b) for b in ladder}
        ms = [s.latency * 1000 for s in ok]
        lines.append(
            f"| {name} | {len(served)} | {in_time / len(served):.1%} | "
            f"{sum(s.status == 429 for s in served) / len(served):.1%} | "
            f"{sum(s.status not in (200, 429) for s in served)} | {steps:.2f} | "
            f"{percentile(ms, 50):.0f} / {percentile(ms, 99):.0f} | "
            f"{len(images) / elapsed:.1f} | {fd:.2f} ({len(images)}) | {acc:.3f} |"
        )
    n = max(min(served_n), 500)
    say(f"quality: offline reference at n={n} per budget")
    model = Repository(ROOT / "model_repo").load(args.model)
    lines += [
        f"\nOffline, the same model and harness at n={n} (seed {args.seed}): ",
        "| steps | FD | class accuracy |",
        "|---|---|---|",
    ]
    for steps in ladder:
        cell = quality.evaluate(ref, model, spec.sampling.default_sampler, steps, n, seed=args.seed)
        lines.append(f"| {steps} | {cell.fd:.2f} | {cell.accuracy:.3f} |")
    lines.append(f"| real training images (floor) | {ref.floor(n):.2f} | - |")
    print("\n".join(lines), flush=True)
    if args.pools is not None:
        print("\n".join(mix_table(ref, args.pools, spec, mixes, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
