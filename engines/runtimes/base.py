"""The runtime protocol: a compiled network behind forward(inputs) -> outputs.

A runtime runs the bare network F(x, c_noise, cond) of a model, never the sampler: the
denoiser wrappers (engines/denoisers.py) keep their preconditioning and call RuntimeNet,
which packs x, c_noise and the conditioning into named tensors. Every runtime checks the
names, shapes and dtypes of what it is given against the network's IOSpec first, so a
wrong input is a clear error rather than a crash inside ONNX Runtime or TensorRT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

PRECISIONS = ("fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class RuntimeUnavailable(RuntimeError):
    """A runtime cannot run here (missing package, no GPU, unsupported precision)."""


class RuntimeInputError(ValueError):
    """Inputs that do not match the network's IOSpec; the message names the input."""


RANDOM_LENGTH = 24  # a dynamic dimension's size in random inputs


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: dtype and the shape of one row (the batch is dim 0).
    A None dimension is dynamic (a vocoder's frames): any size is accepted there."""

    name: str
    dtype: torch.dtype
    row_shape: tuple[int | None, ...]

    def shape(self, rows: int) -> tuple[int | None, ...]:
        return (rows, *self.row_shape)

    @property
    def dynamic(self) -> bool:
        return None in self.row_shape

    def fits(self, shape: Sequence[int], rows: int) -> bool:
        want = self.shape(rows)
        return len(shape) == len(want) and all(
            w is None or w == g for w, g in zip(want, shape, strict=True)
        )


@dataclass(frozen=True)
class IOSpec:
    """What a network takes and gives, every tensor with a dynamic batch dimension."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dynamic(self) -> bool:
        """Whether a dimension besides the batch is dynamic (no fixed-shape engines)."""
        return any(t.dynamic for t in (*self.inputs, *self.outputs))

    def require_static(self, runtime: str) -> None:
        """RuntimeUnavailable for runtimes that compile fixed shapes per batch bucket."""
        if self.dynamic:
            raise RuntimeUnavailable(
                f"{runtime} compiles fixed shapes; this network has a dynamic dimension"
            )

    def signature(self) -> str:
        """A stable text of names, dtypes and row shapes (part of the build cache key)."""
        parts = [
            f"{kind}:{t.name}:{str(t.dtype).removeprefix('torch.')}:{list(t.row_shape)}"
            for kind, group in (("in", self.inputs), ("out", self.outputs))
            for t in group
        ]
        return ";".join(parts)

    def validate(self, inputs: dict[str, Tensor]) -> int:
        """Check names, dtypes and shapes; return the batch size (rows)."""
        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self.input_names]
        if missing or extra:
            raise RuntimeInputError(
                f"the network takes inputs {self.input_names}; missing {missing}, "
                f"unexpected {extra}"
            )
        rows = None
        for t in self.inputs:
            value = inputs[t.name]
            if not isinstance(value, Tensor) or value.dtype != t.dtype:
                got = value.dtype if isinstance(value, Tensor) else type(value).__name__
                raise RuntimeInputError(f"input {t.name!r} must be a {t.dtype} tensor, got {got}")
            rows = value.shape[0] if rows is None and value.ndim else rows
            if value.ndim == 0 or not t.fits(value.shape, rows):
                raise RuntimeInputError(
                    f"input {t.name!r} must have shape {['batch', *t.row_shape]} with the "
                    f"same batch as the other inputs ({rows}), got {list(value.shape)}"
                )
        if not rows:
            raise RuntimeInputError("inputs must have at least one row")
        return rows

    def random(
        self, rows: int, generator: torch.Generator, device: str = "cpu", label_high: int = 1
    ) -> dict[str, Tensor]:
        """Random inputs of `rows` rows (equivalence checks, benchmarks); dynamic dimensions
        get RANDOM_LENGTH."""
        out = {}
        for t in self.inputs:
            shape = tuple(RANDOM_LENGTH if d is None else d for d in t.shape(rows))
            if t.dtype == torch.int64:
                value = torch.randint(0, label_high, shape, generator=generator)
            else:
                value = torch.randn(shape, generator=generator, dtype=t.dtype)
            out[t.name] = value.to(device)
        return out


class Runtime(Protocol):
    """A loaded network: `forward` takes and returns tensors on `device`."""

    name: str
    precision: str
    device: str
    io: IOSpec

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]: ...


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Padded batch sizes that compiled engines are specialised for: 1, 2, 4, ... and the
    model's max_batch_size (CUDA graphs per bucket, TensorRT optimisation profiles)."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return (*buckets, max_batch_size)


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `rows` rows."""
    for size in buckets:
        if rows <= size:
            return size
    raise RuntimeInputError(
        f"a batch of {rows} rows is over the largest bucket ({buckets[-1]}, the model's "
        "max_batch_size)"
    )


class RuntimeNet:
    """The network call F(x, c_noise, cond) the denoiser wrappers make, run by a runtime.

    Conditioning the network does not take is ignored (guidance_scale is the CFG wrapper's);
    a missing label means the null label (unconditional), as in UNet.embed.
    """

    def __init__(self, runtime: Runtime, null_label: int = 0) -> None:
        self.runtime, self.null_label = runtime, null_label
        self.io = runtime.io

    def __call__(self, x: Tensor, c_noise: Tensor, cond=None) -> Tensor:
        device = self.runtime.device
        inputs = {}
        for t in self.io.inputs:
            if t.name == "x":
                value = x
            elif t.name == "c_noise":
                value = c_noise
            elif cond is not None and t.name in cond:
                value = cond[t.name]
            elif t.name == "label":
                value = torch.full((len(x),), self.null_label, dtype=torch.int64)
            else:
                raise RuntimeInputError(f"this network needs cond[{t.name!r}]")
            inputs[t.name] = _moved(value, t.dtype, device)
        out = self.runtime.forward(inputs)[self.io.outputs[0].name]
        return _moved(out, x.dtype, x.device)


def _moved(value: Tensor, dtype: torch.dtype, device: str | torch.device) -> Tensor:
    """value.to(device=device, dtype=dtype), without the call where it is there already:
    what `.to` returns then (value itself), less a dispatch through torch for each of a
    pass's inputs and its output."""
    if value.dtype == dtype and value.device == torch.device(device):
        return value
    return value.to(device=device, dtype=dtype)
