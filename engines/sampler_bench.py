"""Sampler accuracy versus NFE on a Gaussian mixture, with and without teleportation.

Deterministic samplers are scored by RMSE against the exact probability-flow endpoint of
the same starting noise; every sampler (stochastic ones included) by the sliced
Wasserstein-2 distance between its samples and fresh samples of the mixture, next to the
floor of two independent data sets. Teleport jumps along the exact flow of the mixture's
Gaussian approximation (its mean and covariance) to sigma_skip, then runs the sampler.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engines.analytic import GaussianMixture
from engines.gaussian import GaussianStats
from engines.noise import RowNoise
from engines.samplers import INFO, create, drive, nfe
from engines.schedules import karras_sigmas, teleport_sigmas

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


@dataclass
class BenchConfig:
    dim: int = 8
    components: int = 4
    rows: int = 512
    seed: int = 0
    nfes: tuple[int, ...] = (1, 2, 4, 5, 8, 10, 20)
    sigma_skip: float = 8.0
    samplers: tuple[str, ...] = field(
        default_factory=lambda: tuple(
            n for n, info in INFO.items() if n != "teleport" and not info.guided
        )
    )


class CountingDenoiser:
    """Counts denoiser calls (one per sampler request, i.e. NFE)."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        return self.fn(x, sigma, cond)


def sliced_w2(a: Tensor, b: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point sets."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa, _ = (a.to(torch.float64) @ dirs).sort(0)
    pb, _ = (b.to(torch.float64) @ dirs).sort(0)
    return float(((pa - pb) ** 2).mean().sqrt())


def steps_for(name: str, budget: int) -> int | None:
    """The most steps whose NFE fits the budget, or None if even its minimum does not."""
    need = INFO[name].min_steps({})
    best = None
    for steps in range(1, budget + 1):
        if nfe(name, karras_sigmas(steps)) <= budget:
            best = steps
    return best if best is not None and best >= need else None


@dataclass
class Cell:
    rmse: float | None
    sw2: float
    nfe: int


def run_one(
    mixture: GaussianMixture,
    gaussian: GaussianStats | None,
    name: str,
    budget: int,
    x_t: Tensor,
    exact: Tensor,
    data: Tensor,
    sigma_skip: float,
) -> Cell | None:
    steps = steps_for(name, budget)
    if steps is None:
        return None
    sigmas = karras_sigmas(steps, SIGMA_MIN, sigma_skip if gaussian else SIGMA_MAX)
    seeds = list(range(len(x_t)))
    counter = CountingDenoiser(mixture.denoiser())
    if gaussian is None:
        gen = create(name, x_t, sigmas, RowNoise(seeds))
    else:
        grid = teleport_sigmas(SIGMA_MAX, sigmas)
        gen = create("teleport", x_t, grid, RowNoise(seeds), gaussian=gaussian, then=name)
    out = drive(gen, counter)
    rmse = None if INFO[name].stochastic else float(((out - exact) ** 2).sum(1).mean().sqrt())
    return Cell(rmse, sliced_w2(out, data), counter.calls)


def run(config: BenchConfig, progress=None) -> tuple[dict, float, float]:
    """All cells: {(sampler, teleport, nfe): Cell}, the SW2 floor, and seconds taken."""
    progress = progress or sys.stderr  # looked up now: tests swap sys.stderr
    start = time.perf_counter()
    mixture = GaussianMixture.random(config.dim, config.components, seed=config.seed)
    mean, cov = mixture.moments()
    gaussian = GaussianStats.from_moments(mean[None], cov[None], (config.dim,))
    g = torch.Generator().manual_seed(config.seed + 1)
    x_t = torch.randn(config.rows, config.dim, generator=g, dtype=torch.float64) * SIGMA_MAX
    print(f"solving the exact flow for {config.rows} rows ...", file=progress, flush=True)
    exact = mixture.flow(x_t, SIGMA_MAX, 0.0)
    data = mixture.sample(config.rows, g)
    floor = sliced_w2(exact, data)  # the exact flow's endpoints are exact samples
    cells = {}
    for i, name in enumerate(config.samplers):
        print(f"[{i + 1}/{len(config.samplers)}] {name}", file=progress, flush=True)
        for tele in (False, True):
            for budget in config.nfes:
                cells[name, tele, budget] = run_one(
                    mixture,
                    gaussian if tele else None,
                    name,
                    budget,
                    x_t,
                    exact,
                    data,
                    config.sigma_skip,
                )
    return cells, floor, time.perf_counter() - start


def _fmt(cell: Cell | None, nfe: int, metric: str) -> str:
    if cell is None:
        return "—"
    value = getattr(cell, metric)
    text = "—" if value is None else (f"{value:.2e}" if value < 0.01 else f"{value:.3f}")
    return text if cell.nfe == nfe else f"{text} ({cell.nfe})"


def table(config: BenchConfig, cells: dict, metric: str) -> str:
    header = "| sampler | teleport | " + " | ".join(f"NFE {n}" for n in config.nfes) + " |"
    lines = [header, "|" + "---|" * (len(config.nfes) + 2)]
    for name in config.samplers:
        if metric == "rmse" and INFO[name].stochastic:
            continue
        for tele in (False, True):
            row = [_fmt(cells[name, tele, n], n, metric) for n in config.nfes]
            lines.append(f"| {name} | {'yes' if tele else 'no'} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def report(config: BenchConfig, cells: dict, floor: float, seconds: float) -> str:
    best = {}
    for budget in config.nfes:
        for tele in (False, True):
            scored = [
                (c.rmse, n)
                for (n, t, k), c in cells.items()
                if k == budget
                and t == tele
                and c is not None
                and c.rmse is not None
                and c.nfe == budget
            ]
            best[budget, tele] = min(scored) if scored else None
    wins = [
        f"NFE {n}: {best[n, True][1]}+teleport {best[n, True][0]:.3f} "
        f"vs {best[n, False][1]} {best[n, False][0]:.3f}"
        for n in config.nfes
        if best[n, True] and best[n, False]
    ]
    return "\n".join(
        [
            f"# fewstep bench samplers: {config.components}-component Gaussian mixture in "
            f"{config.dim} dims, {config.rows} rows, seed {config.seed}",
            f"Karras grid sigma {SIGMA_MAX} -> {SIGMA_MIN} -> 0; teleport jumps {SIGMA_MAX} -> "
            f"{config.sigma_skip} along the exact flow of the mixture's Gaussian approximation "
            "(0 NFE).",
            "A cell with (k) spent k NFE: the most steps within the budget.",
            "",
            "## RMSE to the exact probability-flow endpoint (deterministic samplers)",
            "",
            table(config, cells, "rmse"),
            "",
            "## Sliced W2 to the data distribution "
            f"(all samplers; floor between two data sets: {floor:.3f})",
            "",
            table(config, cells, "sw2"),
            "",
            "Best deterministic RMSE per budget, teleport vs none: " + "; ".join(wins),
            f"({seconds:.1f} s)",
        ]
    )
