"""Searching a sampler's sigma grid: a monotone parameterisation and a pattern search.

A grid of `steps` steps is [sigma_max, s_1, ..., s_{steps-1}, 0]: the start and the final
0 are fixed, the steps - 1 interior levels are free (with a free end, the last level too:
the sample ends there, and its last step may then be second order; the order of each step
is then a discrete coordinate of the search, as in USF's solver search). They are written
as increments of log sigma from sigma_max down to a floor (the model's sigma_min): softmax
weights over `steps` increments (one more with a free end: what lies below it), the first
weight's logit held at 0, so every point of R^dims is a valid, strictly decreasing grid
and the search needs no constraints (the parameterisation of AutoDiffusion / BOSS-style
step searches, made unconstrained). The objective is any function of the grid (and the
orders); `pattern_search` minimises it derivative-free (compass search:
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
    """Grids of `steps` steps from sigma_max whose levels lie above `floor`: ending at 0
    (the steps - 1 interior levels are free), or with `free_end` at a free last level
    above `floor`, where the sample ends (steps free levels). With `max_order` > 0 the
    order of each step (1..max_order, samplers.check_orders's rules) is searched too."""

    steps: int
    sigma_max: float
    floor: float
    free_end: bool = False
    max_order: int = 0

    def __post_init__(self) -> None:
        if self.steps < 2:
            raise ValueError(f"a grid with an interior needs at least 2 steps, got {self.steps}")
        if not 0 < self.floor < self.sigma_max:
            raise ValueError(f"need 0 < floor < sigma_max, got {self.floor}, {self.sigma_max}")

    @property
    def dims(self) -> int:
        return self.steps if self.free_end else self.steps - 1

    def sigmas(self, z: Sequence[float]) -> Tensor:
        """The grid (float64, steps + 1 levels) of a point z of R^dims."""
        if len(z) != self.dims:
            raise ValueError(f"z must have {self.dims} coordinates, got {len(z)}")
        logits = torch.tensor([0.0, *z], dtype=torch.float64)
        weights = torch.softmax(logits, 0)
        span = math.log(self.sigma_max) - math.log(self.floor)
        levels = (math.log(self.sigma_max) - span * weights.cumsum(0)[:-1]).exp()
        top = torch.tensor([self.sigma_max], dtype=torch.float64)
        if self.free_end:  # the last weight is what lies between the end and the floor
            return torch.cat([top, levels])
        return torch.cat([top, levels, torch.zeros(1, dtype=torch.float64)])

    def point(self, sigmas: Tensor) -> list[float]:
        """The z of a grid [sigma_max, interior..., end] (levels clamped to the floor; a
        final 0 in a free-end space taken as the floor), so that sigmas(point(g))
        reproduces g up to MIN_WEIGHT."""
        values = [float(v) for v in sigmas]
        if len(values) != self.steps + 1 or (values[-1] != 0 and not self.free_end):
            raise ValueError(f"need {self.steps + 1} levels ending in 0, got {values}")
        free = values[1:] if self.free_end else values[1:-1]
        logs = [math.log(self.sigma_max), *(math.log(max(v, self.floor)) for v in free)]
        logs.append(math.log(self.floor))
        span = logs[0] - logs[-1]
        weights = [max((a - b) / span, MIN_WEIGHT) for a, b in itertools.pairwise(logs)]
        return [math.log(w / weights[0]) for w in weights[1:]]

    def plain_orders(self) -> list[int] | None:
        """The schedule a search of orders starts from: DPM-Solver++(2M)'s and UniPC's own
        at few steps (warm-up, then 2, first order into a final 0); None without orders."""
        if not self.max_order:
            return None
        orders = [min(2, i + 1) for i in range(self.steps)]
        if not self.free_end:
            orders[-1] = 1
        return orders

    def order_moves(self, orders: Sequence[int]) -> list[list[int]]:
        """The schedules that differ from `orders` in one step's order, step by step."""
        moves = []
        for i in range(1, self.steps):
            if i == self.steps - 1 and not self.free_end:
                continue  # into sigma = 0 only first order is defined
            for order in range(1, min(self.max_order, i + 1) + 1):
                if order != orders[i]:
                    moves.append([*orders[:i], order, *orders[i + 1 :]])
        return moves


@dataclass
class Trial:
    """One objective evaluation of the search."""

    z: list[float]
    sigmas: list[float]
    value: float
    seconds: float
    orders: list[int] | None = None  # None: the sampler's own schedule


@dataclass
class SearchResult:
    best: Trial
    start: Trial  # the best of the starting grids
    trials: list[Trial] = field(default_factory=list)
    stopped: str = ""  # why the search ended: "converged", "evaluations", "time"


Start = Tensor | tuple[Tensor, Sequence[int] | None]


def pattern_search(
    space: GridSpace,
    objective: Callable[[Tensor, list[int] | None], float],
    starts: Sequence[Start],
    step: float = 1.0,
    min_step: float = 0.125,
    max_evals: int = 20,
    deadline: float | None = None,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Minimise objective(sigmas, orders) over the grids (and order schedules) of `space`:
    evaluate the starting grids exactly as given (a start is a grid, or a (grid, orders)
    pair), then from the best, try +-step along each coordinate in turn and, where the
    space searches orders, each one-step change of the schedule (taking the first that
    improves), halving the step after a sweep without improvement, until the step falls
    below min_step, max_evals evaluations were spent or time.monotonic() passes deadline.
    Deterministic for a deterministic objective (fixed noise seeds)."""
    trials: list[Trial] = []

    def run(z: list[float], orders: list[int] | None, sigmas: Tensor | None = None) -> Trial:
        sigmas = space.sigmas(z) if sigmas is None else sigmas.to(torch.float64)
        start = time.perf_counter()
        value = float(objective(sigmas, orders))
        trial = Trial(list(z), sigmas.tolist(), value, time.perf_counter() - start, orders)
        trials.append(trial)
        shown = f"  orders {orders}" if orders is not None else ""
        log(f"  eval {len(trials):3d}: {value:.5f}  sigmas {_fmt(trial.sigmas)}{shown}")
        return trial

    firsts = []
    for s in starts:
        grid, orders = s if isinstance(s, tuple) else (s, space.plain_orders())
        if not isinstance(s, tuple) and orders is not None and float(grid[-1]) == 0:
            orders[-1] = 1  # a plain start ending at 0, in a space with a free end
        firsts.append(run(space.point(grid), None if orders is None else list(orders), grid))
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
        for coordinate in range(space.dims + space.steps):
            for z, orders in _neighbours(space, best, coordinate, step):
                stopped = out_of_budget()
                if stopped:
                    break
                trial = run(z, orders)
                if trial.value < best.value:
                    best, improved = trial, True
                    break
            if stopped:
                break
        if not improved and not stopped:
            step /= 2
    return SearchResult(best, start, trials, stopped or "converged")


def _neighbours(space: GridSpace, best: Trial, coordinate: int, step: float) -> list:
    """The (z, orders) to try along one coordinate: +-step on a z coordinate (the first
    space.dims), else the other orders of step coordinate - space.dims (none where the
    space searches no orders or that step's order is fixed)."""
    if coordinate < space.dims:
        out = []
        for sign in (1.0, -1.0):
            z = list(best.z)
            z[coordinate] += sign * step
            out.append((z, best.orders))
        return out
    i = coordinate - space.dims
    if best.orders is None or not space.max_order:
        return []
    return [(list(best.z), o) for o in space.order_moves(best.orders) if o[i] != best.orders[i]]


def _fmt(sigmas: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in sigmas) + "]"
