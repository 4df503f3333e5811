"""One small request over every protocol of one `fewstep serve`, side by side.

    .venv/bin/python loadtest/protocols.py [--seconds 9] [--rounds 3] [--concurrency 1,16]

The request: one fashion-gaussian image (label "sneaker"), 1 euler step, a new seed each
time. The same server answers it as the OpenAI-style endpoint (JSON, a base64 PNG), as OIP
HTTP with binary tensors and with JSON tensors (bodies built by tritonclient, sent with the
same aiohttp session as the OpenAI requests), as OIP gRPC (tritonclient.grpc.aio), and, for
reference, through tritonclient.http.aio itself (aiohttp too, plus its own encoding). Each
row is a closed loop of `concurrency` clients for `--seconds`, in `--rounds` interleaved
parts, each after a short warm-up.

Where the time goes, per request: `server job` is the server's own submit-to-result time
(queue wait, sampling, encoding; reported in every response), `protocol` is the client's
p50 latency minus that p50: parsing, validation, serialisation, the transport and the client.
Server and client CPU milliseconds per request come from /proc and process_time. The load
generator shares the machine's cores with the server, so every row pays for its client too.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import tritonclient.grpc.aio as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.procs import Processes, fewstep, free_port  # noqa: E402

MODEL = "fashion-gaussian"
LABEL, STEPS, SAMPLER = "sneaker", 1, "euler"


def ServerProcess(grpc: bool = True) -> Processes:
    """`fewstep serve` with HTTP and (unless grpc=False) gRPC on free loopback ports."""
    port, grpc_port = free_port(), free_port()
    cmd = fewstep("serve", "--host", "127.0.0.1", "--port", str(port))
    cmd += ["--grpc-port", str(grpc_port)] if grpc else ["--no-grpc"]
    server = Processes([cmd], port, {"FEWSTEP_MODELS": f'["{MODEL}"]'}, "/v2/health/ready")
    server.grpc_port = grpc_port
    return server


# -- one request per protocol: send it, check it, return the server's job seconds ------------

Call = Callable[[int], Awaitable[float]]


def oip_inputs(module, seed: int, binary: bool = True) -> list:
    def tensor(name, array, datatype):
        t = module.InferInput(name, list(array.shape), datatype)
        if module is grpcclient:
            t.set_data_from_numpy(array)
        else:
            t.set_data_from_numpy(array, binary_data=binary)
        return t

    return [
        tensor("label", np.array([LABEL.encode()], dtype=object), "BYTES"),
        tensor("seed", np.array([seed], dtype=np.int64), "INT64"),
        tensor("steps", np.array([STEPS], dtype=np.int32), "INT32"),
        tensor("sampler", np.array([SAMPLER.encode()], dtype=object), "BYTES"),
    ]


# Bodies are made once per seed of a pool, so the load generator spends its CPU on sending
# and reading, the same for every HTTP row.
SEEDS = 256


def openai_call(session: aiohttp.ClientSession, url: str) -> Call:
    bodies = [
        json.dumps(
            {"model": MODEL, "prompt": LABEL, "steps": STEPS, "sampler": SAMPLER, "seed": seed}
        ).encode()
        for seed in range(SEEDS)
    ]
    headers = {"Content-Type": "application/json"}

    async def call(seed: int) -> float:
        async with session.post(url, data=bodies[seed % SEEDS], headers=headers) as r:
            r.raise_for_status()
            data = json.loads(await r.read())
        assert base64.b64decode(data["data"][0]["b64_json"])[:4] == b"\x89PNG"
        return data["timings"]["total_seconds"]

    return call


def oip_http_call(session: aiohttp.ClientSession, url: str, binary: bool) -> Call:
    """OIP over plain HTTP with the request bodies tritonclient makes."""
    output = [httpclient.InferRequestedOutput("image", binary_data=binary)]
    requests = []
    for seed in range(SEEDS):
        body, json_size = httpclient.InferenceServerClient.generate_request_body(
            oip_inputs(httpclient, seed, binary), outputs=output
        )
        length = {} if json_size is None else {"Inference-Header-Content-Length": str(json_size)}
        requests.append((body, length))

    async def call(seed: int) -> float:
        body, headers = requests[seed % SEEDS]
        async with session.post(url, data=body, headers=headers) as r:
            r.raise_for_status()
            length, content = r.headers.get("Inference-Header-Content-Length"), await r.read()
        header = json.loads(content[: int(length)] if length else content)
        image = content[int(length) :] if length else bytes(header["outputs"][0]["data"])
        assert len(image) == 28 * 28
        return header["parameters"]["total_seconds"]

    return call


def tritonclient_http_call(client) -> Call:
    async def call(seed: int) -> float:
        result = await client.infer(MODEL, oip_inputs(aiohttpclient, seed))
        assert result.as_numpy("image").shape == (1, 28, 28, 1)
        return result.get_response()["parameters"]["total_seconds"]

    return call


def grpc_call(client) -> Call:
    async def call(seed: int) -> float:
        result = await client.infer(MODEL, oip_inputs(grpcclient, seed))
        assert result.as_numpy("image").shape == (1, 28, 28, 1)
        return result.get_response().parameters["total_seconds"].double_param

    return call


# -- the measurement ------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    concurrency: int
    seconds: float  # measured wall time
    latencies: list[float]
    jobs: list[float]  # the server's job seconds (submit to result)
    server_cpu: float  # CPU seconds, in all
    client_cpu: float

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def closed_loop(call: Call, concurrency: int, seconds: float, seed0: int) -> tuple:
    latencies, jobs = [], []
    seeds = iter(range(seed0, seed0 + 10**8))
    stop = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < stop:
            begin = time.perf_counter()
            job = await call(next(seeds))
            latencies.append(time.perf_counter() - begin)
            jobs.append(job)

    begin = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - begin), latencies, jobs


async def measure(
    server: ServerProcess,
    plain: ServerProcess,
    concurrencies: list[int],
    seconds: float,
    rounds: int,
) -> list[Row]:
    """Every protocol on `server`, and the OpenAI-style endpoint on `plain` (started with
    --no-grpc: what serving gRPC next to HTTP costs the OpenAI path)."""
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
    infer = f"{server.url}/v2/models/{MODEL}/infer"
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    triton_http = aiohttpclient.InferenceServerClient(f"127.0.0.1:{server.port}", conn_limit=256)
    protocols = [
        (
            "OpenAI-style POST /v1/images/generations",
            server,
            openai_call(session, server.url + "/v1/images/generations"),
        ),
        ("OIP HTTP, binary tensors", server, oip_http_call(session, infer, binary=True)),
        ("OIP HTTP, JSON tensors", server, oip_http_call(session, infer, binary=False)),
        ("OIP gRPC (tritonclient.grpc.aio)", server, grpc_call(grpc)),
        ("OIP HTTP, binary (tritonclient.http.aio)", server, tritonclient_http_call(triton_http)),
        (
            "OpenAI-style, server started with --no-grpc",
            plain,
            openai_call(session, plain.url + "/v1/images/generations"),
        ),
    ]
    rows = []
    try:
        for concurrency in concurrencies:
            # rounds interleave the protocols, so a change in background load (this machine
            # is shared) spreads over all rows instead of biasing one
            parts: dict[str, list[Row]] = {name: [] for name, _, _ in protocols}
            for _ in range(rounds):
                for i, (name, target, call) in enumerate(protocols):
                    print(f"  {name}, concurrency {concurrency} ...", file=sys.stderr, flush=True)
                    parts[name].append(
                        await measure_one(target, name, call, concurrency, seconds / rounds, i)
                    )
            rows += [merge(part) for part in parts.values()]
    finally:
        await session.close()
        await grpc.close()
        await triton_http.close()
    return rows


async def measure_one(
    server: ServerProcess, name: str, call: Call, concurrency: int, seconds: float, i: int
) -> Row:
    await closed_loop(call, concurrency, min(0.5, seconds), 0)  # warm-up
    cpu, client_cpu = server.cpu_seconds(), time.process_time()
    begin = time.perf_counter()
    _, latencies, jobs = await closed_loop(call, concurrency, seconds, i * 10**6)
    elapsed = time.perf_counter() - begin
    return Row(
        name,
        concurrency,
        elapsed,
        latencies,
        jobs,
        server.cpu_seconds() - cpu,
        time.process_time() - client_cpu,
    )


def merge(parts: list[Row]) -> Row:
    first = parts[0]
    return Row(
        first.name,
        first.concurrency,
        sum(p.seconds for p in parts),
        [v for p in parts for v in p.latencies],
        [v for p in parts for v in p.jobs],
        sum(p.server_cpu for p in parts),
        sum(p.client_cpu for p in parts),
    )


def report(rows: list[Row], seconds: float) -> str:
    lines = [
        f"# One small request over each protocol ({MODEL}, n=1, {STEPS} {SAMPLER} step; "
        f"{os.cpu_count()} CPUs shared by server and load generator, {seconds:.0f} s per row)",
        "",
        "| protocol | clients | req/s | p50 ms | p99 ms | server job p50 ms | protocol p50 ms "
        "| server CPU ms/req | client CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p50, job = percentile(r.latencies, 50) * 1e3, percentile(r.jobs, 50) * 1e3
        lines.append(
            f"| {r.name} | {r.concurrency} | {r.rps:.0f} | {p50:.2f} | "
            f"{percentile(r.latencies, 99) * 1e3:.2f} | {job:.2f} | {p50 - job:.2f} | "
            f"{r.server_cpu / len(r.latencies) * 1e3:.2f} | "
            f"{r.client_cpu / len(r.latencies) * 1e3:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=9.0, help="length of each row")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved parts of each row")
    parser.add_argument(
        "--concurrency", default="1,16", help="comma-separated client counts (default 1,16)"
    )
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    with ServerProcess() as server, ServerProcess(grpc=False) as plain:
        rows = uvloop.run(measure(server, plain, concurrencies, args.seconds, args.rounds))
    print(report(rows, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
