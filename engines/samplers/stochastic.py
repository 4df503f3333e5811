"""Stochastic samplers: ancestral and SDE steps that add fresh per-row noise."""

from __future__ import annotations

import math

from torch import Tensor

from engines.noise import RowNoise
from engines.samplers.base import SamplerError, SamplerGen, register


@register(family="sde", stochastic=True)
def dpmpp_sde(
    x: Tensor, sigmas: Tensor, noise: RowNoise, eta: float = 1.0, s_noise: float = 1.0
) -> SamplerGen:
    """SDE-DPM-Solver++(1), Lu et al. 2022; eta 0 is DDIM, eta 1 the DDPM posterior."""
    if not 0 <= eta <= 1:
        raise SamplerError(f"dpmpp_sde eta must be in [0, 1], got {eta}")
    levels = sigmas.tolist()  # floats: a tensor index costs ~1 us
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = yield x, sigma
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        x = (sigma_next / sigma) * math.exp(-eta * h) * x - math.expm1(-h - eta * h) * denoised
        if eta > 0:
            x = x + noise.like(x) * sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise
    return x


@register(family="sde", stochastic=True)
def ddpm(x: Tensor, sigmas: Tensor, noise: RowNoise) -> SamplerGen:
    """Ancestral sampling from the DDPM posterior q(x_s | x_t, x0), Ho et al. 2020.

    The posterior step is exactly SDE-DPM-Solver++(1) at eta 1; ProDiff's student samples
    this way.
    """
    return (yield from dpmpp_sde(x, sigmas, noise, eta=1.0))


@register(family="sde", stochastic=True)
def euler_ancestral(
    x: Tensor, sigmas: Tensor, noise: RowNoise, eta: float = 1.0, s_noise: float = 1.0
) -> SamplerGen:
    """Euler ancestral (k-diffusion): Euler down to sigma_down, then noise up by sigma_up."""
    if not 0 <= eta <= 1:
        raise SamplerError(f"euler_ancestral eta must be in [0, 1], got {eta}")
    levels = sigmas.tolist()  # floats: a tensor index costs ~1 us
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = yield x, sigma
        sigma_up = min(
            sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        )
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        x = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * denoised
        if sigma_next > 0:
            x = x + noise.like(x) * sigma_up * s_noise
    return x
