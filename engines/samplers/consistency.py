"""Consistency-family samplers: each step maps straight to x0, then re-noises."""

from __future__ import annotations

import math

from torch import Tensor

from engines.noise import RowNoise
from engines.samplers.base import SamplerError, SamplerGen, register
from engines.schedules import DiscreteVP


@register(family="consistency", stochastic=True)
def cm_multistep(
    x: Tensor, sigmas: Tensor, noise: RowNoise, sigma_min: float = 0.002
) -> SamplerGen:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): x0, then re-noise.

    Build the grid with engines.schedules.consistency_sigmas to pick points of a Karras
    grid, as the paper's `ts` does.
    """
    if sigma_min < 0:
        raise SamplerError(f"cm_multistep sigma_min must be >= 0, got {sigma_min}")
    levels = sigmas.tolist()  # floats: a tensor index costs ~1 us
    for i in range(len(sigmas) - 1):
        sigma_next = levels[i + 1]
        denoised = yield x, levels[i]
        if sigma_next == 0:
            x = denoised
        else:
            sigma_next = max(sigma_next, sigma_min)
            x = denoised + noise.like(x) * math.sqrt(sigma_next**2 - sigma_min**2)
    return x


@register(family="consistency", stochastic=True)
def lcm(x: Tensor, sigmas: Tensor, noise: RowNoise) -> SamplerGen:
    """LCM's multistep sampling (Luo et al. 2023): x0 from the consistency function, then
    forward-diffuse to the next timestep, no noise after the last.

    Use it with an LCMDenoiser (boundary scalings) on engines.schedules.lcm_sigmas.
    """
    return (yield from cm_multistep(x, sigmas, noise, sigma_min=0.0))


def _tcd_sigma_s(sigma_next: float, gamma: float, schedule: DiscreteVP | None) -> float:
    """TCD's intermediate level s = floor((1 - gamma) t_next), on the schedule's own time."""
    if sigma_next == 0:
        return 0.0
    if schedule is None:
        return (1 - gamma) * sigma_next  # EDM time is sigma itself
    t_next = round(float(schedule.t(sigma_next)))
    return float(schedule.sigma(math.floor((1 - gamma) * t_next)))


@register(family="consistency", stochastic=True)
def tcd(
    x: Tensor,
    sigmas: Tensor,
    noise: RowNoise,
    gamma: float = 0.3,
    schedule: DiscreteVP | None = None,
) -> SamplerGen:
    """Trajectory consistency distillation sampling (Zheng et al. 2024): a DDIM jump to
    s = (1 - gamma) t_next, then re-noise to t_next. gamma 0 is DDIM, gamma 1 LCM-like.

    With a discrete `schedule`, s is floored to an integer timestep as diffusers does.
    """
    if not 0 <= gamma <= 1:
        raise SamplerError(f"tcd gamma must be in [0, 1], got {gamma}")
    steps = len(sigmas) - 1
    levels = sigmas.tolist()  # floats: a tensor index costs ~1 us
    for i in range(steps):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = yield x, sigma
        sigma_s = _tcd_sigma_s(sigma_next, gamma, schedule)
        x = denoised + (sigma_s / sigma) * (x - denoised)
        if gamma > 0 and i < steps - 1:
            x = x + noise.like(x) * math.sqrt(sigma_next**2 - sigma_s**2)
    return x
