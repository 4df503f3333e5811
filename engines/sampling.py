"""Start one request's sampler on a loaded model: grid, seeded noise, conditioning.

The service's worker and the quality harness both sample through this, so a request and
an evaluation with the same seed, sampler and steps draw the same samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engines.denoisers import Cond
from engines.noise import RowNoise
from engines.samplers import SamplerGen, create, nfe
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
) -> tuple[SamplerGen, Cond, int]:
    """The (not yet started) sampler generator, its conditioning, and the NFE it will use.

    The grid is the model's own (`ModelSpec.grid`); with teleport, a jump from sigma_max to
    the model's teleport sigma, then a Karras grid from there. Raises SamplerError /
    ScheduleError for arguments that cannot work.
    """
    spec = model.spec
    s = spec.sampling
    if teleport:
        follower = karras_sigmas(steps, s.sigma_min, s.teleport_sigma, s.rho)
        sigmas = teleport_sigmas(s.sigma_max, follower)
        name, opts = "teleport", {"gaussian": model.gaussian, "labels": labels, "then": sampler}
    else:
        sigmas = spec.grid(steps)  # Karras, or the consistency / LCM picks of its kind
        name, opts = sampler, {}
    noise = RowNoise(seeds)
    x = noise.randn((len(seeds), *spec.shape), dtype=dtype, device=device) * float(sigmas[0])
    cond: Cond = None
    if labels is not None:
        cond = {"label": labels.to(device)}
        if guidance != 1.0:
            cond["guidance_scale"] = torch.full((len(seeds),), guidance, dtype=dtype, device=device)
    return create(name, x, sigmas, noise, **opts), cond, nfe(name, sigmas, opts)
