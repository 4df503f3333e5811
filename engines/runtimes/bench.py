"""`fewstep bench engines MODEL`: the network's throughput on every runtime, side by side.

For each batch size every available runtime variant runs the same random inputs; calls are
interleaved in rounds (a slice of each variant per round) so a noisy neighbour slows them
alike. Reported per cell: samples x NFE per second (rows per second of network forwards),
p50 / p99 milliseconds per forward, the ratio to torch eager fp32 measured in the same
run, and the max abs difference of the output from torch eager fp32. Needs only torch,
numpy, safetensors, PyYAML and (for its rows) onnx / onnxruntime: no service packages.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engines.runtimes.base import Runtime, RuntimeUnavailable
from engines.runtimes.build import EngineSource
from engines.runtimes.export import EngineCache, Progress, stderr_progress
from engines.runtimes.select import prepare

# (runtime, precision) pairs measured on each device; the first is the baseline
VARIANTS = {
    "cpu": (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime-int8", "fp32")),
    "cuda": (
        ("torch", "fp32"),
        ("torch-cudagraphs", "fp32"),
        ("torch", "bf16"),
        ("torch-cudagraphs", "bf16"),
        ("onnxruntime-cuda", "fp32"),
        ("onnxruntime-tensorrt", "fp16"),
        ("tensorrt", "fp16"),
    ),
}
ROUNDS = 5


@dataclass
class BenchConfig:
    model: str
    source: EngineSource  # the model's network (a Repository)
    device: str = "cpu"
    batches: tuple[int, ...] = (1, 8, 32, 128)
    seconds: float = 2.0  # per runtime and batch size
    threads: int = 1  # CPU threads for torch and ONNX Runtime alike
    cache: Path | None = None
    label_high: int = 1  # random labels in 0..label_high-1 (set from the model when loaded)


@dataclass
class Cell:
    variant: str
    batch: int
    times: list[float] = field(default_factory=list)
    error: float = 0.0

    def per_second(self) -> float:
        return self.batch * len(self.times) / sum(self.times)

    def ms(self, q: float) -> float:
        ordered = sorted(self.times)
        return 1000 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeUnavailable(
            f"--device {device}: torch {torch.__version__} sees no GPU "
            f"(CUDA build: {torch.version.cuda or 'none'}); run on a GPU machine or use cpu"
        )


def load_variants(
    config: BenchConfig, progress: Progress
) -> tuple[dict[str, Runtime], list[tuple[str, str]]]:
    """Every variant that loads here, and (variant, reason) for those that do not."""
    repo = config.source
    loaded, skipped = {}, []
    kind = "cuda" if config.device.startswith("cuda") else "cpu"
    for name, precision in VARIANTS[kind]:
        label = f"{name} {precision}"
        progress(f"loading {label} ...")
        ctx = repo.engine_context(
            config.model,
            device=config.device,
            precision=precision,
            cache=EngineCache(config.cache),
            threads=config.threads,
            progress=progress,
            ungated_int8=True,  # a speed measurement: the quality gate is `fewstep build`'s
        )
        config.label_high = ctx.label_high
        try:
            loaded[label] = prepare(name, ctx)
        except RuntimeUnavailable as err:
            skipped.append((label, str(err)))
        except Exception as err:  # report it as a row, measure the others
            skipped.append((label, f"failed to load: {type(err).__name__}: {err}"))
    return loaded, skipped


def measure(runtimes: dict[str, Runtime], config: BenchConfig, progress: Progress) -> list[Cell]:
    """Interleaved timing of every runtime at every batch size."""
    cells = []
    g = torch.Generator().manual_seed(0)
    first = next(iter(runtimes.values()))
    for batch in config.batches:
        inputs = first.io.random(batch, g, config.device, label_high=config.label_high)
        row = {label: Cell(label, batch) for label in runtimes}
        reference = None
        for label, runtime in runtimes.items():  # warm up (captures graphs), and check
            for _ in range(3):
                out = runtime.forward(inputs)["out"]
            _sync(config.device)
            reference = out.float() if reference is None else reference
            row[label].error = float((out.float() - reference).abs().max())
        slice_s = config.seconds / ROUNDS
        for r in range(ROUNDS):
            progress(f"batch {batch}: round {r + 1}/{ROUNDS}")
            for label, runtime in runtimes.items():
                cell, until = row[label], time.perf_counter() + slice_s
                while True:
                    begin = time.perf_counter()
                    runtime.forward(inputs)
                    _sync(config.device)
                    end = time.perf_counter()
                    cell.times.append(end - begin)
                    if end >= until:
                        break
        cells += row.values()
    return cells


def run(config: BenchConfig, progress: Progress = stderr_progress) -> str:
    """Load, measure, and return the markdown report."""
    _check_device(config.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        begin = time.perf_counter()
        runtimes, skipped = load_variants(config, progress)
        cells = measure(runtimes, config, progress)
    finally:
        torch.set_num_threads(threads)
    return report(config, cells, skipped, time.perf_counter() - begin)


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.machine()} CPU, torch {torch.__version__}"


def report(config: BenchConfig, cells: list[Cell], skipped: list, seconds: float) -> str:
    baseline = {c.batch: c for c in cells if c.variant == "torch fp32"}
    lines = [
        f"# fewstep bench engines: {config.model} network on {config.device} "
        f"({_machine(config.device)}; {config.threads} CPU thread(s))",
        "",
        "| runtime | batch | samples x NFE / s | p50 ms | p99 ms | vs torch eager | max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        base = baseline.get(c.batch)
        ratio = f"{c.per_second() / base.per_second():.2f}x" if base else "—"
        lines.append(
            f"| {c.variant} | {c.batch} | {c.per_second():,.0f} | {c.ms(0.5):.3f} | "
            f"{c.ms(0.99):.3f} | {ratio} | {c.error:.1e} |"
        )
    if skipped:
        lines += ["", "Not measured here:"]
        lines += [f"- {label}: {reason}" for label, reason in skipped]
    lines += [
        "",
        f"Timed {config.seconds:g} s per runtime and batch, interleaved in {ROUNDS} rounds; "
        f"max abs diff is against torch eager fp32 on the same inputs ({seconds:.0f} s total).",
    ]
    return "\n".join(lines)
