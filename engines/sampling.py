"""Start one request's sampler on a loaded model: grid, seeded noise, conditioning.

The service's worker and the quality harness both sample through this, so a request and
an evaluation with the same seed, sampler and steps draw the same samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from engines.denoisers import Cond
from engines.noise import RowNoise
from engines.samplers import SamplerError, SamplerGen, create, nfe
from engines.scaling import Choice, Search, Verify, best_of, check, steered
from engines.schedules import karras_sigmas, teleport_sigmas


def start_sampler(
    model,
    sampler: str,
    steps: int,
    seeds: list[int],
    labels: Tensor | None = None,
    teleport: bool = False,
    guidance: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    search: Search | None = None,
    verify: Verify | None = None,
    choice: Choice | None = None,
    grid: str | Tensor = "auto",
    orders: Sequence[int] | None = None,
) -> tuple[SamplerGen, Cond, int]:
    """The (not yet started) sampler generator, its conditioning, and the NFE it will use
    per row.

    The grid is the model's own (`ModelSpec.grid`): `grid` "auto" takes the tuned grid of
    this sampler and step count where model.yaml has one, "tuned" insists on it (GridError
    if none), "karras" takes the plain grid; a tensor is used as the grid itself (what
    `fewstep tune` tries). With teleport, a jump from sigma_max to the model's teleport
    sigma, then a Karras grid from there (teleport keeps its own grid). Raises SamplerError
    / ScheduleError / GridError for arguments that cannot work.

    With a `search` of k > 1 candidates (engines.scaling), `seeds` and `labels` are the
    n * k rows (image-major, scaling.candidate_seeds), `verify` scores x0 predictions, the
    generator returns the n picked rows and `choice` records which and their scores.
    """
    spec = model.spec
    s = spec.sampling
    if teleport:
        follower = karras_sigmas(steps, s.sigma_min, s.teleport_sigma, s.rho)
        sigmas = teleport_sigmas(s.sigma_max, follower)
        name, opts = "teleport", {"gaussian": model.gaussian, "labels": labels, "then": sampler}
    else:
        # tuned, or Karras, or the consistency / LCM picks of its kind
        if isinstance(grid, Tensor):
            sigmas = grid.to(torch.float64)
            opts = {} if orders is None else {"orders": list(orders)}
        else:
            sigmas = spec.grid(steps, sampler, grid)
            opts = spec.grid_options(steps, sampler, grid)
        name = sampler
    noise = RowNoise(seeds)
    x = noise.randn((len(seeds), *spec.shape), dtype=dtype, device=device) * float(sigmas[0])
    cond: Cond = None
    if labels is not None:
        cond = {"label": labels.to(device)}
        if guidance != 1.0:
            cond["guidance_scale"] = torch.full((len(seeds),), guidance, dtype=dtype, device=device)
    used = nfe(name, sigmas, opts)
    if search is None or search.method == "plain":
        return create(name, x, sigmas, noise, **opts), cond, used
    if verify is None or choice is None:
        raise ValueError(f"{search.method} needs a verifier and a Choice to record its pick")
    problem = check(search, name, len(sigmas) - 1, teleport)
    if problem:
        raise SamplerError(problem)
    n = len(seeds) // search.candidates
    gen = create(name, x, sigmas, noise, **opts)
    if search.method == "best_of":
        return best_of(gen, n, search.candidates, verify, choice), cond, used

    def restart(x_from: Tensor, grid: Tensor) -> SamplerGen:
        again = dict(opts)
        if "orders" in opts:  # a restarted multistep sampler has no history: warm up again
            rest = opts["orders"][len(sigmas) - len(grid) :]
            again["orders"] = [min(order, j + 1) for j, order in enumerate(rest)]
        return create(name, x_from, grid, noise, **again)

    gen = steered(gen, restart, x, sigmas, name, n, search, verify, seeds[0], choice)
    return gen, cond, used
