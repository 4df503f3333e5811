"""The ONNX Runtime runtime: CPU, CUDA or TensorRT execution provider over one ONNX file.

CPU: one intra-op thread pool of the size torch uses, sequential execution, every graph
optimisation. CUDA and TensorRT: inputs and the output stay on the GPU through IO binding;
the TensorRT provider keeps its engines (and timing cache) in the build cache, builds fp16
when asked, with one optimisation profile per batch bucket. onnxruntime is imported only
when this runtime is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from engines.runtimes.base import IOSpec, RuntimeUnavailable
from engines.runtimes.tensorrt_rt import profile_shapes

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
PRECISIONS = {"cpu": ("fp32",), "cuda": ("fp32",), "tensorrt": ("fp32", "fp16")}
NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        raise RuntimeUnavailable(
            f"the onnxruntime package is not installed ({err}); install fewstep's `cpu` "
            "extra (onnxruntime) or its `gpu` extra (onnxruntime-gpu)"
        ) from None
    return onnxruntime


def check_provider(provider: str, device: str, precision: str) -> None:
    """RuntimeUnavailable unless this onnxruntime has the provider and it can run the
    network on `device` in `precision`."""
    ort = import_onnxruntime()
    ep = PROVIDERS[provider]
    if precision not in PRECISIONS[provider]:
        raise RuntimeUnavailable(
            f"{ep} runs this network in {list(PRECISIONS[provider])} only, not {precision}"
        )
    if provider == "cpu" and device != "cpu":
        raise RuntimeUnavailable(f"{ep} runs on the CPU; the model loads on {device}")
    if provider != "cpu" and not device.startswith("cuda"):
        raise RuntimeUnavailable(f"{ep} needs a GPU (device cuda); the model loads on {device}")
    available = ort.get_available_providers()
    if ep not in available:
        raise RuntimeUnavailable(
            f"onnxruntime {ort.__version__} has no {ep} (it has {available}); "
            "install fewstep's `gpu` extra (onnxruntime-gpu) in place of onnxruntime"
        )


def _shape_text(shapes: Sequence[dict[str, tuple[int, ...]]]) -> str:
    """ORT's profile syntax: name:d0xd1,...; a name repeated once per profile."""
    return ",".join(
        f"{name}:{'x'.join(map(str, dims))}" for shape in shapes for name, dims in shape.items()
    )


def tensorrt_ep_options(
    io: IOSpec, buckets: Sequence[int], precision: str, cache_dir: Path, device_id: int = 0
) -> dict[str, object]:
    """Options of ORT's TensorRT execution provider: engine and timing caches in cache_dir,
    fp16 when asked, one explicit profile per batch bucket."""
    profiles = profile_shapes(io, buckets)
    return {
        "device_id": device_id,
        "trt_fp16_enable": precision == "fp16",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        "trt_profile_min_shapes": _shape_text([{k: v[0] for k, v in p.items()} for p in profiles]),
        "trt_profile_opt_shapes": _shape_text([{k: v[1] for k, v in p.items()} for p in profiles]),
        "trt_profile_max_shapes": _shape_text([{k: v[2] for k, v in p.items()} for p in profiles]),
    }


class OnnxRuntime:
    """An ONNX file run by one ONNX Runtime execution provider."""

    def __init__(
        self,
        path: Path,
        io: IOSpec,
        provider: str = "cpu",
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
        buckets: Sequence[int] = (1,),
        cache_dir: Path | None = None,
    ) -> None:
        ort = import_onnxruntime()
        check_provider(provider, device, precision)
        ep = PROVIDERS[provider]
        self.name = "onnxruntime" if provider == "cpu" else f"onnxruntime-{provider}"
        self.io, self.precision, self.device = io, precision, device
        self.path = Path(path)  # the artifact (its manifest is beside it)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # idle pool threads sleep instead of spinning: on a small shared machine a spinning
        # pool takes the core the event loop and torch need between passes
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.device_id = torch.device(device).index or 0
        providers: list = [ep]
        if provider == "tensorrt":
            cache_dir = cache_dir or path.parent / "ort-tensorrt"
            cache_dir.mkdir(parents=True, exist_ok=True)
            opts = tensorrt_ep_options(io, buckets, precision, cache_dir, self.device_id)
            providers = [(ep, opts), "CUDAExecutionProvider"]
        elif provider == "cuda":
            providers = [(ep, {"device_id": self.device_id})]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        used = self.session.get_providers()
        if used[0] != ep:
            # onnxruntime-gpu without its CUDA / cuDNN / TensorRT libraries quietly falls
            # back to the CPU; that is not what was asked for
            raise RuntimeUnavailable(
                f"onnxruntime could not start {ep} and fell back to {used}; its log names "
                "the missing CUDA, cuDNN or TensorRT libraries"
            )

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        rows = self.io.validate(inputs)
        if self.device == "cpu":
            feeds = {name: inputs[name].contiguous().numpy() for name in self.io.input_names}
            outs = self.session.run(self.io.output_names, feeds)
            return {n: torch.from_numpy(o) for n, o in zip(self.io.output_names, outs, strict=True)}
        return self._bound(inputs, rows)

    def _bound(self, inputs: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
        """GPU providers: bind torch's device memory in and out, no host copies."""
        binding = self.session.io_binding()
        keep = []
        for t in self.io.inputs:
            value = inputs[t.name].contiguous()
            keep.append(value)
            binding.bind_input(
                t.name, "cuda", self.device_id, NUMPY[t.dtype], tuple(value.shape), value.data_ptr()
            )
        outs = {}
        for t in self.io.outputs:
            out = torch.empty(t.shape(rows), dtype=t.dtype, device=self.device)
            binding.bind_output(
                t.name, "cuda", self.device_id, NUMPY[t.dtype], tuple(out.shape), out.data_ptr()
            )
            outs[t.name] = out
        torch.cuda.current_stream().synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outs
