"""Inference-time scaling: k candidates or particles per image, a verifier picks the best.

- best_of (Ma et al. 2025, "random search" over noises): k candidates per image, each
  from its own noise seed, sampled to the end; the verifier's best is returned.
- steering (Singhal et al. 2025, Feynman-Kac steering): k particles per image; at every
  s-th step each image's particles are weighted by exp(lambda * verifier score of their x0
  prediction) and resampled multinomially, with a generator seeded from the request's
  seed; the verifier picks among the final particles.

Both are wrappers around an ordinary sampler generator over all n * k rows, so candidates
and particles share forward passes with everything else, and the cost is known up front
(n * k rows x steps). Rows are image-major: row i * k + j is candidate j of image i, with
noise seed `seed + i + j * n` (candidate_seeds): candidate 0 is the image a plain request
makes, and a best_of pick is made again by a plain request with the chosen seed.

Resampling and sampler state: a multistep solver keeps per-row history (DPM-Solver++'s
previous x0), which a permutation of the rows would scramble. At a resample point the
wrapper restarts the sampler from the resampled x on the rest of the grid and hands it
the resampled x0 it was waiting for: no extra evaluation, but the first step after a
restart is first order (DPM-Solver++(2M) takes a DPM-Solver-1 step there; consistency
sampling has no history and is unchanged). Each particle keeps its own noise stream (its
RowNoise row), so copies of one ancestor diverge again under stochastic samplers
(consistency, ancestral); under an ODE sampler copies stay identical, and resampling
prunes and duplicates rather than explores. Everything a row's result depends on is its
request's rows, seeds and the verifier, never what else shares the forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engines.denoisers import Guided
from engines.noise import SEED_MAX
from engines.samplers import INFO, SamplerGen

Verify = Callable[[Tensor], Tensor]  # x0 [rows, ...] in sampler space -> scores [rows]
Restart = Callable[[Tensor, Tensor], SamplerGen]  # (x, remaining grid) -> a fresh sampler
_MIX = 0x9E3779B97F4A7C15  # decorrelates the resampling draws from row 0's noise seed


@dataclass(frozen=True)
class Search:
    """How a request searches: k rows per image, resampled every s steps (0: best-of)."""

    candidates: int = 1
    resample_every: int = 0
    potential_scale: float = 1.0  # lambda in exp(lambda * score)

    @property
    def method(self) -> str:
        if self.candidates == 1:
            return "plain"
        return "steering" if self.resample_every else "best_of"


@dataclass
class Choice:
    """What the search picked, filled in when the sampler returns."""

    rows: list[int] = field(default_factory=list)  # the chosen row (i * k + j) of each image
    scores: list[float] = field(default_factory=list)  # the verifier's score of each pick
    resamples: int = 0  # resampling rounds done (steering)


def candidate_seeds(seed: int, n: int, k: int) -> list[int]:
    """Noise seeds of n images x k candidates, image-major: row i*k+j gets seed + i + j*n."""
    return [(seed + i + j * n) % (SEED_MAX + 1) for i in range(n) for j in range(k)]


def resample_points(sampler: str, steps: int, every: int) -> list[int]:
    """Step indices i whose x0 prediction steering weights and resamples on: after every
    s-th evaluation (i = s-1, 2s-1, ...), never after the last (nothing would follow to
    use it), and only where the restarted sampler still has the steps it needs."""
    need = INFO[sampler].min_steps({})
    return [i for i in range(every - 1, steps - 1, every) if steps - i >= need]


def check(search: Search, sampler: str, steps: int, teleport: bool) -> str | None:
    """Why this search cannot run with this sampler and grid (a message), else None."""
    if search.method != "steering":
        return None
    if teleport:
        return "steering cannot follow a teleport jump; drop teleport or use best_of"
    if INFO[sampler].evals_per_step != 1:
        return (
            f"steering needs a sampler with one evaluation per step; {sampler} takes "
            f"{INFO[sampler].evals_per_step}; use another sampler or best_of"
        )
    if not resample_points(sampler, steps, search.resample_every):
        return (
            f"with {steps} steps, resample_every {search.resample_every} never resamples "
            f"({sampler}); lower resample_every, raise steps, or use best_of"
        )
    return None


def _finite(scores: Tensor) -> Tensor:
    """Scores as float64 with non-finite values (a broken sample) ranked last."""
    scores = scores.double()
    return torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -1e30))


def _pick(sample: Tensor, scores: Tensor, n: int, k: int, choice: Choice) -> Tensor:
    best = _finite(scores).view(n, k).argmax(1)
    rows = torch.arange(n) * k + best
    choice.rows = rows.tolist()
    choice.scores = scores.double()[rows].tolist()
    return sample[rows.to(sample.device)]


def _take(x0, rows: Tensor):
    if isinstance(x0, Guided):
        return Guided(*(t[rows.to(t.device)] for t in x0))
    return x0[rows.to(x0.device)]


def ancestors(scores: Tensor, n: int, k: int, scale: float, gen: torch.Generator) -> Tensor:
    """Rows to continue from: per image, k multinomial draws with weights proportional to
    exp(scale * score) (softmax, so any score range is safe)."""
    weights = torch.softmax(scale * _finite(scores).view(n, k), dim=1)
    picks = torch.multinomial(weights, k, replacement=True, generator=gen)
    return (torch.arange(n).view(n, 1) * k + picks).view(-1)


def best_of(gen: SamplerGen, n: int, k: int, verify: Verify, choice: Choice) -> SamplerGen:
    """Run the n*k rows to the end; return each image's best candidate (n rows)."""
    sample = yield from gen
    return _pick(sample, verify(sample), n, k, choice)


def steered(
    gen: SamplerGen,
    restart: Restart,
    x: Tensor,
    sigmas: Tensor,
    sampler: str,
    n: int,
    search: Search,
    verify: Verify,
    seed: int,
    choice: Choice,
) -> SamplerGen:
    """FK steering over n*k particles (see the module docstring): `gen` is the sampler
    started from x on sigmas, `restart` starts it again; returns n rows."""
    k = search.candidates
    points = set(resample_points(sampler, len(sigmas) - 1, search.resample_every))
    draws = torch.Generator().manual_seed((seed + _MIX) % 2**64)
    pending = next(gen)
    step = 0
    while True:
        x_now, sigma = pending
        x0 = yield x_now, sigma
        if step in points:
            values = x0.x0 if isinstance(x0, Guided) else x0
            rows = ancestors(verify(values), n, k, search.potential_scale, draws)
            x0 = _take(x0, rows)
            gen = restart(x_now[rows.to(x_now.device)], sigmas[step:])
            next(gen)  # the restarted sampler asks for this very level: answer it below
            choice.resamples += 1
        try:
            pending = gen.send(x0)
        except StopIteration as stop:
            sample = stop.value
            break
        step += 1
    return _pick(sample, verify(sample), n, k, choice)
