"""`fewstep build MODEL`: build (or reuse) a model's engine and check it against torch.

The artifacts go to the build cache (engines.runtimes.export.EngineCache); the check runs the
runtime and the eager fp32 torch network on the same random inputs at several batch sizes.
fp32 must agree within 1e-4; fp16 and bf16 errors are reported, not judged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from engines.runtimes.export import (
    FP32_TOLERANCE,
    VERIFY_BATCHES,
    BuildError,
    EngineCache,
    Progress,
    max_errors,
    stderr_progress,
    torch_reference,
)
from engines.runtimes.select import EngineContext, prepare


class EngineSource(Protocol):
    """What holds the models' networks (engines.repository.Repository)."""

    def engine_context(self, name: str, version: int | None = None, **options) -> EngineContext:
        """A version's network with what building its engines needs."""


@dataclass(frozen=True)
class BuildReport:
    model: str
    runtime: str
    precision: str
    device: str
    errors: dict[int, float]  # batch size -> max abs error against eager fp32 torch
    artifacts: tuple[Path, ...]

    def ok(self) -> bool:
        return self.precision != "fp32" or max(self.errors.values()) <= FP32_TOLERANCE

    def text(self) -> str:
        worst = max(self.errors.values())
        verdict = (
            f"within {FP32_TOLERANCE:g}"
            if self.ok() and self.precision == "fp32"
            else ("reported, not judged" if self.ok() else f"OVER {FP32_TOLERANCE:g}")
        )
        lines = [
            f"{self.model}: {self.runtime} {self.precision} on {self.device}",
            *(f"  cached: {p}" for p in self.artifacts),
            *(["  nothing to build: torch runs the module itself"] if not self.artifacts else []),
            "  max abs error vs torch fp32: "
            + ", ".join(f"batch {b}: {e:.2e}" for b, e in self.errors.items()),
            f"  worst {worst:.2e} ({verdict})",
        ]
        return "\n".join(lines)


def build_engine(
    repo: EngineSource,
    name: str,
    runtime: str,
    precision: str = "fp32",
    device: str = "cpu",
    cache: EngineCache | None = None,
    force: bool = False,
    progress: Progress = stderr_progress,
) -> BuildReport:
    """Build or reuse the runtime's artifacts for a model, then measure its error."""
    ctx = repo.engine_context(
        name,
        device=device,
        precision=precision,
        cache=cache or EngineCache(),
        force=force,
        progress=progress,
        ungated_int8=True,  # INT8 is built here; its quality gate runs after (the CLI)
    )
    reference = torch_reference(ctx.net, ctx.io)  # before a runtime moves the network
    loaded = prepare(runtime, ctx)
    progress(f"{ctx.model}: {runtime} {precision} against torch fp32")
    errors = max_errors(reference, loaded, VERIFY_BATCHES, ctx.label_high, progress=progress)
    kinds = {"tensorrt": ("onnx", "tensorrt")}.get(runtime, ("onnx",))
    folder = ctx.cache.root / ctx.model
    artifacts = (
        ()
        if runtime.startswith("torch")
        else tuple(sorted(p for kind in kinds for p in folder.glob(f"{kind}-*/model.*")))
    )
    report = BuildReport(ctx.model, runtime, loaded.precision, loaded.device, errors, artifacts)
    if not report.ok():
        raise BuildError(report.text())
    return report
