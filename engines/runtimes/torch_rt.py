"""The torch runtime: eager under inference mode, or one CUDA graph per batch bucket.

Eager runs any batch size. With CUDA graphs every batch bucket
(engines.runtimes.base.batch_buckets) is captured at load; a batch is padded up to the next
bucket and that bucket's graph replays on static buffers. The rows of these networks are
independent, so padding rows never change the real ones. fp16 / bf16 run under autocast
and return fp32. On a GPU the input goes channels-last (NHWC tensor-core convolutions); on
the CPU it stays contiguous, which measured as fast or faster here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from engines.runtimes.base import (
    DTYPES,
    PRECISIONS,
    IOSpec,
    RuntimeUnavailable,
    bucket_for,
)


class TorchRuntime:
    """A torch module behind the runtime protocol (see the module docstring)."""

    def __init__(
        self,
        module: nn.Module,
        io: IOSpec,
        precision: str = "fp32",
        cuda_graphs: bool = False,
        buckets: Sequence[int] = (1,),
    ) -> None:
        if precision not in PRECISIONS:
            raise RuntimeUnavailable(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.module, self.io, self.precision = module.eval(), io, precision
        self.cuda_graphs, self.buckets = cuda_graphs, tuple(buckets)
        self.name = "torch-cudagraphs" if cuda_graphs else "torch"
        if cuda_graphs and not self.device.startswith("cuda"):
            raise RuntimeUnavailable(
                f"CUDA graphs need the network on a GPU (device cuda); it is on {self.device}"
            )
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor]] = {}
        if cuda_graphs:  # capture every bucket now: a capture that fails, fails the load
            with torch.inference_mode():
                for size in self.buckets:
                    self._graphs[size] = self._capture(size)

    @property
    def device(self) -> str:
        return str(next(self.module.parameters()).device)

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        # no weight cache: a captured graph must not hold casts made outside it
        return torch.autocast(device_type, DTYPES[self.precision], cache_enabled=False)

    def _run(self, args: Sequence[Tensor]) -> Tensor:
        if self.device.startswith("cuda") and args[0].ndim == 4:
            args = [args[0].contiguous(memory_format=torch.channels_last), *args[1:]]
        with self._autocast():
            return self.module(*args).float()

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        rows = self.io.validate(inputs)
        args = [inputs[name] for name in self.io.input_names]
        with torch.inference_mode():
            out = self._replay(args, rows) if self.cuda_graphs else self._run(args)
        return {self.io.output_names[0]: out}

    def _replay(self, args: Sequence[Tensor], rows: int) -> Tensor:
        graph, static_in, static_out = self._graphs[bucket_for(rows, self.buckets)]
        for buffer, value in zip(static_in, args, strict=True):
            buffer[:rows].copy_(value)
        graph.replay()
        return static_out[:rows].clone()

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor]:
        """Warm up on a side stream (as torch.cuda.graphs asks), then capture one call."""
        static_in = [
            torch.zeros(t.shape(size), dtype=t.dtype, device=self.device) for t in self.io.inputs
        ]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._run(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._run(static_in)
        return graph, static_in, static_out
