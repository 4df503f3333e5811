"""Pick a model's runtime from its ordered preference list, building artifacts as needed.

model.yaml's `runtimes` lists names from RUNTIMES, fastest first. At load time each is
tried in turn: one that cannot run here (missing package, no GPU, precision it lacks) or
fails to load is skipped with its reason logged, and the first that loads runs the
network. If none loads, torch eager in fp32 does, so a model never fails to serve for
want of a faster engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from engines.runtimes.base import IOSpec, Runtime, RuntimeUnavailable
from engines.runtimes.export import (
    FP32_TOLERANCE,
    OPSET,
    Artifact,
    BuildError,
    EngineCache,
    Exportable,
    Progress,
    cpu_copy,
    export_onnx,
    max_errors,
    torch_reference,
)
from engines.runtimes.onnx_rt import OnnxRuntime, check_provider, import_onnxruntime
from engines.runtimes.quantize import Calibration, gate_refusal, quantize
from engines.runtimes.simulated import LatencyCurve, SimulatedRuntime
from engines.runtimes.tensorrt_rt import (
    TensorRTRuntime,
    build_plan,
    import_tensorrt,
    plan_key_fields,
)
from engines.runtimes.torch_rt import TorchRuntime

log = logging.getLogger("fewstep.engines")


@dataclass
class EngineContext:
    """What building and loading a runtime for one model's network needs."""

    model: str  # "name" or "name@version": the cache folder
    fingerprint: str  # of the weights: part of every cache key
    net: nn.Module
    io: IOSpec
    buckets: tuple[int, ...]
    label_high: int = 1  # random labels in 0..label_high-1 for the equivalence checks
    device: str = "cpu"
    precision: str = "fp32"
    cache: EngineCache = field(default_factory=EngineCache)
    threads: int | None = None
    latency_curve: str | None = None  # the `simulated` runtime's curve file (None: H200)
    calibration: Calibration | None = None  # real-data inputs for INT8 (None: no recipe)
    force: bool = False  # rebuild artifacts even if the cache holds them
    # load an INT8 artifact that has not (yet) passed its quality gate: for `fewstep build`
    # and the gate itself (engines/quality_gate.py); serving never does
    ungated_int8: bool = False
    progress: Progress = log.info


def onnx_artifact(ctx: EngineContext) -> Artifact:
    """The network's ONNX file: exported, checked, and equal to torch within 1e-4."""
    import_onnxruntime()  # fail before exporting, not after
    import onnx

    fields = {
        "fingerprint": ctx.fingerprint,
        "io": ctx.io.signature(),
        "opset": OPSET,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
    }

    def build(path) -> dict:
        net = cpu_copy(ctx.net)
        ctx.progress(f"{ctx.model}: [1/3] exporting the network to ONNX (opset {OPSET})")
        export_onnx(net, ctx.io, path)
        ctx.progress(f"{ctx.model}: [2/3] onnx.checker")
        onnx.checker.check_model(str(path), full_check=True)
        ctx.progress(f"{ctx.model}: [3/3] ONNX Runtime (CPU) against torch, fp32")
        check = OnnxRuntime(path, ctx.io, "cpu", "fp32", threads=ctx.threads)
        errors = max_errors(
            torch_reference(net, ctx.io), check, label_high=ctx.label_high, progress=ctx.progress
        )
        worst = max(errors.values())
        if worst > FP32_TOLERANCE:
            raise BuildError(
                f"{ctx.model}: the ONNX export differs from torch by {worst:.2e} "
                f"(over {FP32_TOLERANCE:g}); it is not used"
            )
        return {"max_abs_error_fp32": {str(k): v for k, v in errors.items()}}

    return ctx.cache.get_or_build(
        ctx.model, "onnx", fields, "model.onnx", build, ctx.progress, ctx.force
    )


def _onnxruntime(provider: str) -> Callable[[EngineContext], Runtime]:
    def load(ctx: EngineContext) -> Runtime:
        check_provider(provider, ctx.device, ctx.precision)  # before exporting anything
        artifact = onnx_artifact(ctx)
        # the TensorRT provider's engines depend on precision and the bucket profiles too
        engines = artifact.path.parent / f"ort-{provider}-{ctx.precision}-{ctx.buckets[-1]}"

        def session() -> Runtime:
            return OnnxRuntime(
                artifact.path,
                ctx.io,
                provider,
                ctx.precision,
                ctx.device,
                ctx.threads,
                ctx.buckets,
                engines,
            )

        try:
            return session()
        except RuntimeUnavailable:
            raise
        except Exception as err:
            if not artifact.rebuilt:  # a cached file ORT cannot read: rebuild it once
                ctx.progress(f"{ctx.model}: cached ONNX failed to load ({err}); rebuilding")
                artifact = onnx_artifact(replace(ctx, force=True))
                return session()
            raise

    return load


def _tensorrt(ctx: EngineContext) -> Runtime:
    trt = import_tensorrt()
    if not ctx.device.startswith("cuda"):
        raise RuntimeUnavailable("TensorRT needs device cuda")
    onnx_file = onnx_artifact(ctx).path
    versions = {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(ctx.device)}
    fields = plan_key_fields(ctx.fingerprint, ctx.io, ctx.buckets, ctx.precision, versions)
    timing = ctx.cache.root / "tensorrt-timing.cache"

    def build(path) -> dict:
        ctx.progress(f"{ctx.model}: building a TensorRT plan ({ctx.precision})")
        return build_plan(onnx_file, path, ctx.io, ctx.buckets, ctx.precision, timing)

    plan = ctx.cache.get_or_build(
        ctx.model, "tensorrt", fields, "model.plan", build, ctx.progress, ctx.force
    )
    return TensorRTRuntime(plan.path, ctx.io, ctx.buckets, ctx.precision, ctx.device)


def _torch(cuda_graphs: bool) -> Callable[[EngineContext], Runtime]:
    def load(ctx: EngineContext) -> Runtime:
        module = Exportable(ctx.net.to(ctx.device), ctx.io)
        return TorchRuntime(module, ctx.io, ctx.precision, cuda_graphs, ctx.buckets)

    return load


def _onnxruntime_int8(ctx: EngineContext) -> Runtime:
    if ctx.calibration is None:
        raise RuntimeUnavailable("INT8 has a calibration recipe for EDM pixel models only")
    if ctx.device != "cpu" or ctx.precision != "fp32":
        raise RuntimeUnavailable("onnxruntime-int8 runs on the CPU from the fp32 export")
    onnx_file = onnx_artifact(ctx)
    fields = {**onnx_file.manifest, "int8": "qdq-conv-percentile-v1"}
    fields = {k: fields[k] for k in ("fingerprint", "io", "opset", "torch", "onnx", "int8")}
    if not ctx.ungated_int8:
        # serving loads only an artifact whose samples were measured against fp32; it never
        # builds one (a build runs the quality gate, minutes on a CPU)
        refused = gate_refusal(ctx.cache, ctx.cache.folder(ctx.model, "onnx-int8", fields))
        if refused:
            name = ctx.model.split("@")[0]
            raise RuntimeUnavailable(
                f"{refused}; build it with `fewstep build {name} --runtime onnxruntime-int8`"
            )

    def build(path) -> dict:
        ctx.progress(f"{ctx.model}: quantizing to INT8 (calibration on Fashion-MNIST)")
        try:
            return quantize(onnx_file.path, path, ctx.calibration)
        except ValueError as err:
            raise BuildError(f"{ctx.model}: {err}; INT8 is not used") from err

    int8 = ctx.cache.get_or_build(
        ctx.model, "onnx-int8", fields, "model.onnx", build, ctx.progress, ctx.force
    )
    runtime = OnnxRuntime(int8.path, ctx.io, "cpu", "fp32", threads=ctx.threads)
    runtime.name, runtime.precision = "onnxruntime-int8", "int8"
    return runtime


def _simulated(ctx: EngineContext) -> Runtime:
    curve = LatencyCurve.load(ctx.latency_curve)
    log.warning(
        "%s: runtime `simulated` FOR MEASUREMENT ONLY: the network does not run; each "
        "forward sleeps for %s and returns zeros",
        ctx.model,
        curve.source,
    )
    return SimulatedRuntime(ctx.io, curve, ctx.precision)


RUNTIMES: dict[str, Callable[[EngineContext], Runtime]] = {
    "tensorrt": _tensorrt,
    "onnxruntime-tensorrt": _onnxruntime("tensorrt"),
    "onnxruntime-cuda": _onnxruntime("cuda"),
    "torch-cudagraphs": _torch(cuda_graphs=True),
    "onnxruntime": _onnxruntime("cpu"),
    "torch": _torch(cuda_graphs=False),
    "onnxruntime-int8": _onnxruntime_int8,  # lossy: only where model.yaml asks for it
    "simulated": _simulated,  # measurement only: sleeps for a GPU's time, returns zeros
}
DEFAULT_PREFERENCE = ("torch",)
# what `fewstep train` writes into a model.yaml: every exact runtime, fastest first (on a GPU
# machine without TensorRT this lands on CUDA graphs; on a CPU machine on ONNX Runtime)
FASTEST_FIRST = tuple(n for n in RUNTIMES if n not in ("simulated", "onnxruntime-int8"))


@dataclass(frozen=True)
class Selection:
    """The runtime that loaded, and why each one before it in the list did not."""

    runtime: Runtime
    skipped: tuple[tuple[str, str], ...] = ()

    def describe(self) -> dict:
        return {
            "name": self.runtime.name,
            "precision": self.runtime.precision,
            "device": self.runtime.device,
            "skipped": [{"runtime": n, "reason": r} for n, r in self.skipped],
        }


def prepare(name: str, ctx: EngineContext) -> Runtime:
    """Load one runtime by name; RuntimeUnavailable says why it cannot run here."""
    if name not in RUNTIMES:
        raise RuntimeUnavailable(f"unknown runtime {name!r}; the runtimes are {list(RUNTIMES)}")
    return RUNTIMES[name](ctx)


def select(preferences: Sequence[str], ctx: EngineContext) -> Selection:
    """The first runtime of `preferences` that loads; torch fp32 eager if none does."""
    skipped = []
    for name in preferences:
        try:
            runtime = prepare(name, ctx)
        except RuntimeUnavailable as err:
            skipped.append((name, str(err)))
        except Exception as err:  # a broken engine must not take the worker down
            skipped.append((name, f"failed to load: {type(err).__name__}: {err}"))
            log.exception("%s: runtime %s failed to load", ctx.model, name)
        else:
            _log_choice(ctx.model, runtime, skipped)
            return Selection(runtime, tuple(skipped))
    runtime = prepare("torch", replace(ctx, precision="fp32"))
    skipped.append(("(fallback)", f"none of {list(preferences)} loaded; torch eager fp32 runs"))
    _log_choice(ctx.model, runtime, skipped)
    return Selection(runtime, tuple(skipped))


def _log_choice(model: str, runtime: Runtime, skipped: Sequence[tuple[str, str]]) -> None:
    for name, reason in skipped:
        log.info("%s: runtime %s skipped: %s", model, name, reason)
    where = f"{runtime.name} ({runtime.precision} on {runtime.device})"
    log.info("%s: the network runs on %s", model, where)
