"""Per-row seeded noise, so a sample never depends on what else shares its batch.

Each row (one image or clip) owns a CPU generator seeded with its own seed; noise is drawn
row by row in float64 on the CPU and only then cast and moved. The same seed therefore gives
the same noise alone, inside any batch, on any device and in any dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

SEED_MAX = 2**63 - 1


class RowNoise:
    """Standard normal noise for a request's rows, one seeded generator per row."""

    def __init__(self, seeds: Sequence[int]) -> None:
        if len(seeds) == 0:
            raise ValueError("RowNoise needs at least one seed")
        for seed in seeds:
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
                raise ValueError(f"seeds must be integers in 0..{SEED_MAX}, got {seed!r}")
        self.seeds = list(seeds)
        self._generators = [torch.Generator().manual_seed(seed) for seed in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, shape: Sequence[int], dtype=torch.float32, device=None) -> Tensor:
        """Noise of shape [rows, *shape[1:]]; shape[0] must equal the number of rows."""
        if shape[0] != len(self):
            raise ValueError(f"asked for {shape[0]} rows of noise, this request has {len(self)}")
        rows = [
            torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float64)
            for g in self._generators
        ]
        return torch.stack(rows).to(dtype=dtype, device=device)

    def like(self, x: Tensor) -> Tensor:
        """Fresh noise with the shape, dtype and device of x."""
        return self.randn(x.shape, dtype=x.dtype, device=x.device)


def row_seeds(seed: int, n: int) -> list[int]:
    """Seeds of the n rows of a request seeded with `seed`: seed, seed + 1, ... (wrapping)."""
    return [(seed + i) % (SEED_MAX + 1) for i in range(n)]
