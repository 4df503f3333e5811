"""Per-row seeded noise, so a sample never depends on what else shares its batch.

Each row (one image or clip) owns a CPU generator seeded with its own seed; noise is drawn
row by row in float64 on the CPU and only then cast and moved. The same seed therefore gives
the same noise alone, inside any batch, on any device and in any dtype.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import Tensor

SEED_MAX = 2**63 - 1


class RowNoise:
    """Standard normal noise for a request's rows, one seeded generator per row.

    A row's stream is that of a fresh `torch.Generator().manual_seed(seed)`. Most requests
    draw once (their initial noise: the ODE samplers): that draw reseeds one scratch
    generator per thread row by row and keeps each row's state after it (0.6 us, where
    building and seeding a generator per row took 2 us: more CPU than an 8-image request's
    PNGs on a saturated server). A second draw (the stochastic samplers) builds each row's
    own generator from that state, so every draw continues the row's one stream, exactly.
    """

    def __init__(self, seeds: Sequence[int]) -> None:
        if len(seeds) == 0:
            raise ValueError("RowNoise needs at least one seed")
        for seed in seeds:
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
                raise ValueError(f"seeds must be integers in 0..{SEED_MAX}, got {seed!r}")
        self.seeds = list(seeds)
        self._generators: list[torch.Generator] | None = None
        self._states: list[Tensor] | None = None  # each row's state after its first draw

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, shape: Sequence[int], dtype=torch.float32, device=None) -> Tensor:
        """Noise of shape [rows, *shape[1:]]; shape[0] must equal the number of rows."""
        if shape[0] != len(self):
            raise ValueError(f"asked for {shape[0]} rows of noise, this request has {len(self)}")
        row = tuple(shape[1:])
        if self._generators is None and self._states is None:
            scratch, rows, self._states = _scratch(), [], []
            for seed in self.seeds:
                rows.append(_draw(row, scratch.manual_seed(seed)))
                self._states.append(scratch.get_state())
        else:
            rows = [_draw(row, g) for g in self._own()]
        return torch.stack(rows).to(dtype=dtype, device=device)

    def _own(self) -> list[torch.Generator]:
        """Each row's generator, where its stream's first draw left it."""
        if self._generators is None:  # randn made the first draw, so the states are there
            self._generators = [torch.Generator().set_state(s) for s in self._states or ()]
            self._states = None
        return self._generators

    def like(self, x: Tensor) -> Tensor:
        """Fresh noise with the shape, dtype and device of x."""
        return self.randn(x.shape, dtype=x.dtype, device=x.device)


_local = threading.local()


def _scratch() -> torch.Generator:
    """This thread's generator for first draws (reseeded for every row)."""
    g = getattr(_local, "generator", None)
    if g is None:
        g = _local.generator = torch.Generator()
    return g


def _draw(row: tuple[int, ...], g: torch.Generator) -> Tensor:
    return torch.randn(row, generator=g, dtype=torch.float64)


def row_seeds(seed: int, n: int) -> list[int]:
    """Seeds of the n rows of a request seeded with `seed`: seed, seed + 1, ... (wrapping)."""
    return [(seed + i) % (SEED_MAX + 1) for i in range(n)]
