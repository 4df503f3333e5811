"""The sampler registry, argument checks, and the drivers that answer a sampler's requests.

A sampler is a generator function `fn(x, sigmas, noise, **opts)`: it yields (x, sigma)
whenever it needs the denoiser, receives x0 = D(x, sigma) back, and returns the final
sample. It draws fresh noise only from `noise` (a RowNoise), so the driver is free to put
many samplers' requests into one forward pass.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engines.denoisers import Cond, Denoiser, Guided
from engines.noise import RowNoise

SamplerGen = Generator[tuple[Tensor, float], Tensor, Tensor]
SamplerFn = Callable[..., SamplerGen]


class SamplerError(ValueError):
    """A sampler was asked for with a name, grid or option it cannot use."""


@dataclass(frozen=True)
class SamplerInfo:
    """What a caller needs to know about a sampler before running it."""

    name: str
    fn: SamplerFn
    min_steps: Callable[[dict], int]
    stochastic: bool
    family: str  # "ode", "sde" or "consistency"; "teleport" wraps another sampler
    evals_per_step: int  # 2 for two-stage methods (one fewer when the last step reaches 0)
    guided: bool = False  # needs a CFG++ denoiser (a Guided pair per call)
    max_order: int = 0  # > 0: takes an `orders` schedule (one order per step) up to this


SAMPLERS: dict[str, SamplerFn] = {}
INFO: dict[str, SamplerInfo] = {}


def register(
    *,
    family: str,
    stochastic: bool = False,
    min_steps: int | Callable[[dict], int] = 1,
    evals_per_step: int = 1,
    guided: bool = False,
    max_order: int = 0,
) -> Callable[[SamplerFn], SamplerFn]:
    """Add a sampler to SAMPLERS under its function name."""

    def add(fn: SamplerFn) -> SamplerFn:
        rule = min_steps if callable(min_steps) else (lambda _opts, n=min_steps: n)
        INFO[fn.__name__] = SamplerInfo(
            fn.__name__, fn, rule, stochastic, family, evals_per_step, guided, max_order
        )
        SAMPLERS[fn.__name__] = fn
        return fn

    return add


@functools.cache
def options(name: str) -> dict[str, object]:
    """A sampler's options and their defaults."""
    params = list(inspect.signature(SAMPLERS[name]).parameters.values())[3:]
    return {
        p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY or p.default is not p.empty
    }


def nfe(name: str, sigmas: Tensor, opts: dict | None = None) -> int:
    """Denoiser evaluations a sampler spends on a grid."""
    opts = opts or {}
    if name == "teleport":
        return nfe(opts.get("then", "dpmpp_2m"), sigmas[1:], opts.get("then_opts"))
    steps = len(sigmas) - 1
    if INFO[name].evals_per_step == 2:
        return 2 * steps - (1 if float(sigmas[-1]) == 0 else 0)
    return steps


def check_grid(sigmas: Tensor) -> None:
    """Reject a sigma grid that is not 1-D, finite, positive and strictly decreasing."""
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or len(sigmas) < 2:
        raise SamplerError("sigmas must be a 1-D tensor of at least 2 noise levels (1 step)")
    values = sigmas.tolist()  # grids are short: plain Python beats tensor ops here
    if not all(math.isfinite(v) for v in values):
        raise SamplerError("sigmas must be finite; build the grid with engines.schedules")
    if any(b >= a for a, b in itertools.pairwise(values)):
        raise SamplerError(
            f"sigmas must be strictly decreasing (noisiest first), got {values[:8]}..."
        )
    if values[-1] < 0 or min(values[:-1]) <= 0:
        raise SamplerError("sigmas must be positive, except the last, which may be 0")


def check_orders(name: str, orders: Sequence[int], steps: int, final_zero: bool) -> None:
    """Reject an order schedule (one solver order per step) that sampler `name` cannot run.

    A multistep method has no history at its first step (order 1 there) and at most i
    earlier points at step i (order <= i + 1); a step into sigma = 0 has an infinite
    log-SNR step, so only the first-order update is defined there.
    """
    top = INFO[name].max_order if name in INFO else 0
    if top == 0:
        takes = sorted(n for n, info in INFO.items() if info.max_order)
        raise SamplerError(f"sampler {name!r} takes no order schedule; those that do: {takes}")
    values = list(orders)
    if len(values) != steps:
        raise SamplerError(f"orders must give one order per step ({steps}), got {values}")
    for i, order in enumerate(values):
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= top:
            raise SamplerError(
                f"orders[{i}] must be an integer in 1..{top} for {name}, got {order!r}"
            )
        if order > i + 1:
            raise SamplerError(
                f"orders[{i}] is {order}, but step {i} has only {i} earlier points: at most {i + 1}"
            )
    if final_zero and values[-1] != 1:
        raise SamplerError(
            f"orders[{steps - 1}] must be 1: the last step ends at sigma = 0, where only the "
            "first-order update is defined (end the grid at a small positive sigma instead)"
        )


def create(name: str, x: Tensor, sigmas: Tensor, noise: RowNoise, **opts) -> SamplerGen:
    """Check name, grid and options of a sampler and return its generator (not started)."""
    if name not in SAMPLERS:
        raise SamplerError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    known = options(name)
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise SamplerError(
            f"sampler {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options are {sorted(known) or 'none'}"
        )
    check_grid(sigmas)
    steps, need = len(sigmas) - 1, INFO[name].min_steps(opts)
    if steps < need:
        raise SamplerError(
            f"sampler {name!r} with these options needs at least {need} steps, got {steps}; "
            "ask for more steps or a lower-order sampler"
        )
    if opts.get("orders") is not None:
        check_orders(name, opts["orders"], steps, float(sigmas[-1]) == 0)
    if len(x) != len(noise):
        raise SamplerError(f"x has {len(x)} rows but noise has seeds for {len(noise)}")
    return SAMPLERS[name](x, sigmas, noise, **opts)


def drive(gen: SamplerGen, denoiser: Denoiser, cond: Cond = None) -> Tensor:
    """Run one sampler to the end, answering each request with denoiser(x, sigma, cond)."""
    try:
        x, sigma = next(gen)
        while True:
            sigmas = torch.full((len(x),), sigma, dtype=x.dtype, device=x.device)
            x, sigma = gen.send(denoiser(x, sigmas, cond))
    except StopIteration as stop:
        return stop.value


def cat_cond(conds: Sequence[Cond]) -> Cond:
    """Concatenate per-row conditioning dicts (all None, or all with the same keys)."""
    if all(c is None for c in conds):
        return None
    keys = set(conds[0] or ())
    if any(c is None or set(c) != keys for c in conds):
        raise SamplerError("requests batched together must carry the same conditioning keys")
    if len(conds) == 1:  # one request: its tensors as they are (cat would copy them)
        return {k: conds[0][k] for k in sorted(keys)}
    return {k: torch.cat([c[k] for c in conds]) for k in sorted(keys)}


def split_rows(out: Tensor | Guided, sizes: list[int]) -> list:
    """Split a denoiser's output (a tensor, or a CFG++ Guided pair) back into requests."""
    if isinstance(out, Guided):
        return [Guided(*parts) for parts in zip(*(t.split(sizes) for t in out), strict=True)]
    if len(sizes) == 1 and sizes[0] == len(out):
        return [out]  # one request: all of it (split would return a view of the same rows)
    return list(out.split(sizes))


def drive_many(
    gens: Sequence[SamplerGen], denoiser: Denoiser, conds: Sequence[Cond] | None = None
) -> list[Tensor]:
    """Run several samplers together: every round, one forward pass over all pending rows.

    This is step-level batching in its plainest form (no size limit, no deadlines): the
    service's scheduler adds those policies on top of the same idea.
    """
    conds = list(conds) if conds is not None else [None] * len(gens)
    results: list[Tensor | None] = [None] * len(gens)
    pending: dict[int, tuple[Tensor, float]] = {}
    for i, gen in enumerate(gens):
        pending[i] = next(gen)
    while pending:
        order = list(pending)
        xs = [pending[i][0] for i in order]
        sigma = torch.cat(
            [
                torch.full((len(x),), pending[i][1], dtype=x.dtype)
                for i, x in zip(order, xs, strict=True)
            ]
        )
        x0 = denoiser(torch.cat(xs), sigma, cat_cond([conds[i] for i in order]))
        for i, part in zip(order, split_rows(x0, [len(x) for x in xs]), strict=True):
            try:
                pending[i] = gens[i].send(part)
            except StopIteration as stop:
                results[i] = stop.value
                del pending[i]
    return results  # type: ignore[return-value]


def lambda_of(sigma: float) -> float:
    """Half log-SNR of an EDM sigma: lambda = -log(sigma) (inf at sigma = 0)."""
    return math.inf if sigma == 0 else -math.log(sigma)
