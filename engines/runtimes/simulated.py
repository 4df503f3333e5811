"""`simulated`: a runtime FOR MEASUREMENT ONLY, whose forward pass costs what a GPU's would.

It does not run the network. Its forward sleeps (releasing the GIL, as a GPU kernel launch
and synchronise would) for the time a measured batch-latency curve gives for the batch's
rows, and returns zeros of the network's output shape. A zero network output makes every
EDM-family denoiser return c_skip(sigma) * x, so the samplers run their full arithmetic
and stay finite; the images are meaningless. It lets a machine without a GPU measure what
serving costs at GPU speed: scheduling, continuous vs static batching, CPU per sample.

The curve is a YAML (or JSON) file `seconds: {batch: seconds, ...}`; between measured
batch sizes the time is interpolated linearly, below the first it is the first, above the
last it grows along the last segment. The default is the H200 CUDA-graph table of
fashion-edm (curves/h200-cudagraphs-fashion-edm.yaml). It is selected only by name
(`runtimes: [simulated]` in model.yaml, or `fewstep serve --runtime simulated`), never by
default, and it is named `simulated` everywhere a runtime is shown (/v1/models, metrics,
logs).
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

from engines.runtimes.base import IOSpec

DEFAULT_CURVE = Path(__file__).parent / "curves" / "h200-cudagraphs-fashion-edm.yaml"


@dataclass(frozen=True)
class LatencyCurve:
    """Seconds per forward pass as a piecewise-linear function of the batch size."""

    batches: tuple[int, ...]
    seconds: tuple[float, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if not self.batches or len(self.batches) != len(self.seconds):
            raise ValueError("a latency curve needs batch sizes and one time for each")
        if list(self.batches) != sorted(set(self.batches)) or self.batches[0] < 1:
            raise ValueError(f"batch sizes must be positive and ascending, got {self.batches}")
        if any(s <= 0 for s in self.seconds):
            raise ValueError(f"times must be positive seconds, got {self.seconds}")

    @classmethod
    def load(cls, path: str | Path | None = None) -> LatencyCurve:
        path = Path(path) if path else DEFAULT_CURVE
        try:
            data = yaml.safe_load(path.read_text())  # JSON is YAML too
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML or JSON ({err})") from None
        table = data.get("seconds") if isinstance(data, dict) else None
        if not isinstance(table, dict) or not table:
            raise ValueError(f"{path}: expected a mapping `seconds: {{batch: seconds, ...}}`")
        points = sorted((int(b), float(s)) for b, s in table.items())
        return cls(tuple(b for b, _ in points), tuple(s for _, s in points), str(path))

    def __call__(self, rows: int) -> float:
        b, s = self.batches, self.seconds
        if rows <= b[0] or len(b) == 1:
            return s[0] if rows <= b[0] else s[0] * rows / b[0]
        i = min(bisect.bisect_left(b, rows), len(b) - 1)
        lo, hi = i - 1, i
        return s[lo] + (s[hi] - s[lo]) * (rows - b[lo]) / (b[hi] - b[lo])


class SimulatedRuntime:
    """Sleeps for the curve's time, returns zeros of the output's shape (see the module)."""

    name = "simulated"

    def __init__(self, io: IOSpec, curve: LatencyCurve, precision: str = "fp32") -> None:
        self.io, self.curve, self.precision, self.device = io, curve, precision, "cpu"
        self.out = io.outputs[0]

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        rows = self.io.validate(inputs)
        end = time.perf_counter() + self.curve(rows)
        out = torch.zeros(self.out.shape(rows), dtype=self.out.dtype)
        remaining = end - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        return {self.out.name: out}
