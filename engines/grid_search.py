"""Searching a sampler's sigma grid: a monotone parameterisation and a pattern search.

A grid of `steps` steps is [sigma_max, s_1, ..., s_{steps-1}, 0]: the start and the final
0 are fixed, the steps - 1 interior levels are free. They are written as increments of
log sigma from sigma_max down to a floor (the model's sigma_min): softmax weights over
`steps` increments, the first weight's logit held at 0, so every point of R^(steps-1) is
a valid, strictly decreasing grid and the search needs no constraints (the parameterisation
of AutoDiffusion / BOSS-style step searches, made unconstrained). The objective is any
function of the grid; `pattern_search` minimises it derivative-free (compass search:
Kolda, Lewis & Torczon 2003), seeded and under an evaluation and wall-time budget.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

MIN_WEIGHT = 1e-4  # a grid's last increment may be ~0 (Karras ends at sigma_min)


@dataclass(frozen=True)
class GridSpace:
    """Grids of `steps` steps from sigma_max to 0 whose interior lies above `floor`."""

    steps: int
    sigma_max: float
    floor: float

    def __post_init__(self) -> None:
        if self.steps < 2:
            raise ValueError(f"a grid with an interior needs at least 2 steps, got {self.steps}")
        if not 0 < self.floor < self.sigma_max:
            raise ValueError(f"need 0 < floor < sigma_max, got {self.floor}, {self.sigma_max}")

    @property
    def dims(self) -> int:
        return self.steps - 1

    def sigmas(self, z: Sequence[float]) -> Tensor:
        """The grid (float64, steps + 1 levels) of a point z of R^dims."""
        if len(z) != self.dims:
            raise ValueError(f"z must have {self.dims} coordinates, got {len(z)}")
        logits = torch.tensor([0.0, *z], dtype=torch.float64)
        weights = torch.softmax(logits, 0)
        span = math.log(self.sigma_max) - math.log(self.floor)
        interior = (math.log(self.sigma_max) - span * weights.cumsum(0)[:-1]).exp()
        top = torch.tensor([self.sigma_max], dtype=torch.float64)
        return torch.cat([top, interior, torch.zeros(1, dtype=torch.float64)])

    def point(self, sigmas: Tensor) -> list[float]:
        """The z of a grid [sigma_max, interior..., 0] (interior clamped to the floor), so
        that sigmas(point(g)) reproduces g up to MIN_WEIGHT."""
        values = [float(v) for v in sigmas]
        if len(values) != self.steps + 1 or values[-1] != 0:
            raise ValueError(f"need {self.steps + 1} levels ending in 0, got {values}")
        logs = [math.log(self.sigma_max)]
        logs += [math.log(max(v, self.floor)) for v in values[1:-1]]
        logs.append(math.log(self.floor))
        span = logs[0] - logs[-1]
        weights = [max((a - b) / span, MIN_WEIGHT) for a, b in itertools.pairwise(logs)]
        return [math.log(w / weights[0]) for w in weights[1:]]


@dataclass
class Trial:
    """One objective evaluation of the search."""

    z: list[float]
    sigmas: list[float]
    value: float
    seconds: float


@dataclass
class SearchResult:
    best: Trial
    start: Trial  # the best of the starting grids
    trials: list[Trial] = field(default_factory=list)
    stopped: str = ""  # why the search ended: "converged", "evaluations", "time"


def pattern_search(
    space: GridSpace,
    objective: Callable[[Tensor], float],
    starts: Sequence[Tensor],
    step: float = 1.0,
    min_step: float = 0.125,
    max_evals: int = 20,
    deadline: float | None = None,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Minimise objective(sigmas) over the grids of `space`: evaluate the starting grids,
    then from the best, try +-step along each coordinate in turn (taking the first that
    improves), halving the step after a sweep without improvement, until the step falls
    below min_step, max_evals evaluations were spent or time.monotonic() passes deadline.
    Deterministic for a deterministic objective (fixed noise seeds)."""
    trials: list[Trial] = []

    def run(z: list[float]) -> Trial:
        sigmas = space.sigmas(z)
        start = time.perf_counter()
        value = float(objective(sigmas))
        trial = Trial(list(z), sigmas.tolist(), value, time.perf_counter() - start)
        trials.append(trial)
        log(f"  eval {len(trials):3d}: {value:.5f}  sigmas {_fmt(trial.sigmas)}")
        return trial

    firsts = [run(space.point(s)) for s in starts]
    best = start = min(firsts, key=lambda t: t.value)

    def out_of_budget() -> str:
        if len(trials) >= max_evals:
            return "evaluations"
        if deadline is not None and time.monotonic() >= deadline:
            return "time"
        return ""

    stopped = out_of_budget()
    while not stopped and step >= min_step:
        improved = False
        for i in range(space.dims):
            for sign in (1.0, -1.0):
                stopped = out_of_budget()
                if stopped:
                    break
                z = list(best.z)
                z[i] += sign * step
                trial = run(z)
                if trial.value < best.value:
                    best, improved = trial, True
                    break
            if stopped:
                break
        if not improved and not stopped:
            step /= 2
    return SearchResult(best, start, trials, stopped or "converged")


def _fmt(sigmas: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in sigmas) + "]"
