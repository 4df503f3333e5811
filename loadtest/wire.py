"""What the hot path's JSON costs: the stdlib's json against service/wire.py (orjson).

    .venv/bin/python loadtest/wire.py [--images 8] [--png-bytes 700] [--repeat 20000]

Times, per request of `--images` PNGs of `--png-bytes` each (28x28 Fashion-MNIST PNGs are
600-800 bytes): the images response body (what FastAPI's JSONResponse writes, against
wire.dumps), a result record through the Redis queue (the worker's to_dict and dumps, the
API's loads and from_dict, then the response's base64 text: the stdlib decodes and
re-encodes each PNG, EncodedOutputs hands the record's text over), and a job record. Prints
microseconds per request, best of 5 runs, and the ratio.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engines.modalities import ImageInputs  # noqa: E402
from service import wire  # noqa: E402
from service.jobs import Job, JobResult, JobState  # noqa: E402


def best_us(fn, repeat: int) -> float:
    """Microseconds per call, best of 5 runs of `repeat` calls."""
    runs = []
    for _ in range(5):
        begin = time.perf_counter()
        for _ in range(repeat):
            fn()
        runs.append((time.perf_counter() - begin) / repeat * 1e6)
    return min(runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--png-bytes", type=int, default=700)
    parser.add_argument("--repeat", type=int, default=20000)
    args = parser.parse_args()
    pngs = [os.urandom(args.png_bytes) for _ in range(args.images)]
    seeds = list(range(args.images))
    result = JobResult("job_x", JobState.SUCCEEDED, outputs=pngs, seeds=seeds, nfe=4)
    result.queue_seconds, result.compute_seconds, result.total_seconds = 0.001, 0.004, 0.006
    body = {
        "created": 1764547200,
        "data": [
            {"b64_json": base64.b64encode(p).decode(), "revised_prompt": "bag", "seed": s}
            for p, s in zip(pngs, seeds, strict=True)
        ],
        "model": "fashion-edm@2",
        "sampler": "dpmpp_2m",
        "steps": 4,
        "grid": "tuned",
        "quality": "fixed",
        "nfe": 4,
        "total_nfe": 4 * args.images,
        "scaling": None,
        "timings": {"queue_ms": 1.0, "compute_ms": 4.0, "total_ms": 6.0, "first_step_ms": 1.2},
        "runtime": "simulated",
        "fingerprint": "sha256:0123456789abcdef",
    }
    job = Job("fashion-edm", 2, ImageInputs([3] * args.images), args.images, "dpmpp_2m", 4, 7)
    job.cost = 4 * args.images

    def stdlib_response():
        json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()

    def record_stdlib():  # worker: to_dict + dumps; API: loads + from_dict + base64 again
        raw = json.dumps(result.to_dict())
        back = JobResult.from_dict(json.loads(raw))
        [base64.b64encode(o).decode() for o in back.outputs]

    def record_wire():
        raw = wire.dumps(result.to_dict())
        JobResult.from_dict(wire.loads(raw)).base64_outputs()

    rows = [
        ("images response body", stdlib_response, lambda: wire.dumps(body)),
        ("result record: worker to API to response text", record_stdlib, record_wire),
        (
            "job record: API to worker",
            lambda: Job.from_dict(json.loads(json.dumps(job.to_dict()))),
            lambda: Job.from_dict(wire.loads(wire.dumps(job.to_dict()))),
        ),
    ]
    print(
        f"| per request ({args.images} PNGs of {args.png_bytes} bytes) | stdlib json, us | "
        "service/wire.py, us | stdlib / wire |\n|---|---|---|---|"
    )
    for label, old, new in rows:
        a, b = best_us(old, args.repeat), best_us(new, args.repeat)
        print(f"| {label} | {a:.1f} | {b:.1f} | {a / b:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
