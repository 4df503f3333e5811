"""The TensorRT runtime: a plan built from the ONNX export, run with preallocated buffers.

Written against the TensorRT 10 Python API (named I/O tensors, execute_async_v3). The plan
has one optimisation profile per batch bucket (min = previous bucket + 1, opt = max = the
bucket) and one execution context per profile; a batch is padded to its bucket and runs
on that bucket's preallocated device buffers. Builds reuse a timing cache kept beside the
plan. `tensorrt` is imported only inside the functions that need it: this module loads,
and its pure-Python parts (profiles, cache keys) run, where TensorRT is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from engines.runtimes.base import IOSpec, RuntimeUnavailable, bucket_for

MISSING = "tensorrt Python package not installed (pip install -e '.[gpu]' brings it)"
PRECISIONS = ("fp32", "fp16", "bf16")
WORKSPACE_BYTES = 1 << 30


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as err:
        raise RuntimeUnavailable(f"{MISSING} ({err})") from None
    return tensorrt


def profile_shapes(
    io: IOSpec, buckets: Sequence[int]
) -> list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
    """One profile per bucket: {input: (min, opt, max)} covering batches (prev, bucket]."""
    profiles, low = [], 1
    for size in buckets:
        profiles.append({t.name: (t.shape(low), t.shape(size), t.shape(size)) for t in io.inputs})
        low = size + 1
    return profiles


def plan_key_fields(
    fingerprint: str, io: IOSpec, buckets: Sequence[int], precision: str, versions: dict
) -> dict[str, object]:
    """What a plan depends on: weights, I/O, profiles, precision, TensorRT and GPU."""
    return {
        "fingerprint": fingerprint,
        "io": io.signature(),
        "buckets": list(buckets),
        "precision": precision,
        **versions,
    }


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    io: IOSpec,
    buckets: Sequence[int],
    precision: str,
    timing_cache: Path,
) -> dict[str, object]:
    """Parse the ONNX file, build a serialized plan with the bucket profiles, write it."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for shapes in profile_shapes(io, buckets):
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the plan (see its log above)")
    plan_path.write_bytes(bytes(plan))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"tensorrt": trt.__version__}


class TensorRTRuntime:
    """A deserialized plan: one context and one set of device buffers per bucket."""

    def __init__(
        self, plan_path: Path, io: IOSpec, buckets: Sequence[int], precision: str, device: str
    ) -> None:
        trt = import_tensorrt()
        self.name, self.io, self.precision, self.device = "tensorrt", io, precision, device
        self.buckets = tuple(buckets)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan_path} is not a plan this TensorRT can load")
        self.stream = torch.cuda.Stream(device=device)
        self.contexts, self.buffers = {}, {}
        for index, size in enumerate(self.buckets):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(index, self.stream.cuda_stream)
            buffers = {
                t.name: torch.zeros(t.shape(size), dtype=t.dtype, device=device)
                for t in (*io.inputs, *io.outputs)
            }
            for name, buffer in buffers.items():
                if name in io.input_names:
                    context.set_input_shape(name, tuple(buffer.shape))
                context.set_tensor_address(name, buffer.data_ptr())
            self.contexts[size], self.buffers[size] = context, buffers
        self.stream.synchronize()

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        rows = self.io.validate(inputs)
        size = bucket_for(rows, self.buckets)
        buffers = self.buffers[size]
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            for name in self.io.input_names:
                buffers[name][:rows].copy_(inputs[name], non_blocking=True)
            if not self.contexts[size].execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT failed to run the plan")
            outs = {n: buffers[n][:rows].clone() for n in self.io.output_names}
        current.wait_stream(self.stream)
        return outs
