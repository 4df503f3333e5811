"""Noise-level grids and VP noise schedules, all expressed in EDM sigma.

fewstep's samplers work in EDM (variance-exploding) coordinates: x_ve = x_vp / alpha and
sigma = sigma_vp / alpha = exp(-lambda), where lambda is the half log-SNR. A grid is a
1-D float64 tensor of strictly decreasing sigmas; the last entry may be 0 (denoise fully)
or a small positive sigma_min. Its number of steps is len(grid) - 1.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


class ScheduleError(ValueError):
    """A schedule or grid was asked for with arguments that cannot work."""


def _check_range(steps: int, sigma_min: float, sigma_max: float) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ScheduleError(f"steps must be a positive integer, got {steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ScheduleError(
            f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )


def _finish(ramp: Tensor, final_zero: bool) -> Tensor:
    return torch.cat([ramp, ramp.new_zeros(1)]) if final_zero else ramp


def karras_sigmas(
    steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    final_zero: bool = True,
) -> Tensor:
    """Karras et al. 2022 (EDM) rho-spaced grid with `steps` steps.

    With final_zero the ramp has `steps` points from sigma_max to sigma_min and a 0 is
    appended (k-diffusion's get_sigmas_karras); without it the ramp has steps + 1 points.
    """
    _check_range(steps, sigma_min, sigma_max)
    points = steps if final_zero else steps + 1
    if points == 1:
        return _finish(torch.tensor([sigma_max], dtype=torch.float64), final_zero)
    ramp = torch.linspace(0, 1, points, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, final_zero)


def logsnr_sigmas(
    steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, final_zero: bool = True
) -> Tensor:
    """Grid uniform in log-SNR (= uniform in log sigma), DPM-Solver's `logSNR` skip type."""
    _check_range(steps, sigma_min, sigma_max)
    points = steps if final_zero else steps + 1
    if points == 1:
        return _finish(torch.tensor([sigma_max], dtype=torch.float64), final_zero)
    ramp = torch.linspace(math.log(sigma_max), math.log(sigma_min), points, dtype=torch.float64)
    return _finish(ramp.exp(), final_zero)


def time_uniform_sigmas(
    steps: int, schedule: VPSchedule, t_min: float | None = None, t_max: float | None = None
) -> Tensor:
    """Grid uniform in the VP schedule's own time t, t_max to t_min (DPM-Solver's time_uniform)."""
    t_min = schedule.t_min if t_min is None else t_min
    t_max = schedule.t_max if t_max is None else t_max
    if not isinstance(steps, int) or steps < 1:
        raise ScheduleError(f"steps must be a positive integer, got {steps!r}")
    if not schedule.t_min <= t_min < t_max <= schedule.t_max:
        raise ScheduleError(
            f"need {schedule.t_min} <= t_min < t_max <= {schedule.t_max}, "
            f"got t_min={t_min}, t_max={t_max}"
        )
    t = torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)
    return schedule.sigma(t)


def edm_to_vp(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """EDM sigma -> (alpha, sigma_vp) of the variance-preserving process with that SNR."""
    alpha = torch.rsqrt(1 + sigma**2)
    return alpha, sigma * alpha


def vp_to_edm(alpha: Tensor, sigma_vp: Tensor) -> Tensor:
    """(alpha, sigma_vp) of a VP process -> EDM sigma = sigma_vp / alpha."""
    return sigma_vp / alpha


class VPSchedule:
    """A variance-preserving schedule: alpha(t)^2 + sigma_vp(t)^2 = 1 for t in [t_min, t_max]."""

    t_min: float
    t_max: float

    def sigma(self, t: Tensor) -> Tensor:
        """EDM sigma at time t."""
        raise NotImplementedError

    def t(self, sigma: Tensor) -> Tensor:
        """Time t at EDM sigma (the inverse of `sigma`)."""
        raise NotImplementedError

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(torch.tensor(self.t_min, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(torch.tensor(self.t_max, dtype=torch.float64)))


@dataclass(frozen=True)
class LinearVP(VPSchedule):
    """Continuous linear-beta VP-SDE (Song et al. 2021): beta(t) = b_min + t (b_max - b_min)."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    def sigma(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.sqrt(
            torch.expm1(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)
        )

    def t(self, sigma: Tensor) -> Tensor:
        # Solve a t^2 + b t = log(1 + sigma^2) for the positive root.
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        a, b = 0.5 * (self.beta_max - self.beta_min), self.beta_min
        c = torch.log1p(sigma**2)
        if a == 0:
            return c / b
        return 2 * c / (b + torch.sqrt(b * b + 4 * a * c))


@dataclass(frozen=True)
class CosineVP(VPSchedule):
    """Cosine schedule (Nichol & Dhariwal 2021), clipped at lambda >= -5.1 like DPM-Solver."""

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = field(default=0.0)

    def __post_init__(self) -> None:
        if self.t_max == 0.0:
            object.__setattr__(self, "t_max", float(self.t(torch.tensor(math.exp(5.1)))))

    def _phase(self) -> float:
        return self.s / (1 + self.s) * math.pi / 2

    def sigma(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        alpha_bar = (
            torch.cos((t + self.s) / (1 + self.s) * math.pi / 2) / math.cos(self._phase())
        ) ** 2
        return torch.sqrt(1 / alpha_bar - 1)

    def t(self, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        alpha = torch.rsqrt(1 + sigma**2)
        return 2 * (1 + self.s) / math.pi * torch.arccos(alpha * math.cos(self._phase())) - self.s


class DiscreteVP(VPSchedule):
    """A discrete-time DDPM schedule of T timesteps, given by alphas_cumprod per timestep.

    Fractional timesteps interpolate log sigma linearly between neighbours, so `t` and
    `sigma` are exact inverses on the table and monotone between its points.
    """

    def __init__(self, alphas_cumprod: Tensor) -> None:
        bars = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if bars.ndim != 1 or len(bars) < 2 or not ((bars > 0) & (bars < 1)).all():
            raise ScheduleError(
                "alphas_cumprod must be a 1-D tensor of at least 2 values in (0, 1)"
            )
        if not (bars[1:] < bars[:-1]).all():
            raise ScheduleError("alphas_cumprod must decrease with the timestep")
        self.alphas_cumprod = bars
        self.sigmas = torch.sqrt((1 - bars) / bars)
        self.log_sigmas = self.sigmas.log()
        self.t_min, self.t_max = 0.0, float(len(bars) - 1)

    @classmethod
    def from_betas(cls, betas: Tensor) -> DiscreteVP:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if not ((betas > 0) & (betas < 1)).all():
            raise ScheduleError("betas must lie in (0, 1)")
        return cls(torch.cumprod(1 - betas, 0))

    @classmethod
    def linear(
        cls, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> DiscreteVP:
        """DDPM's linear betas (Ho et al. 2020)."""
        return cls.from_betas(torch.linspace(beta_start, beta_end, steps, dtype=torch.float64))

    @classmethod
    def scaled_linear(
        cls, steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> DiscreteVP:
        """Stable Diffusion's scaled-linear betas (linear in sqrt(beta))."""
        root = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64)
        return cls.from_betas(root**2)

    def __len__(self) -> int:
        return len(self.alphas_cumprod)

    def sigma(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).clamp(self.t_min, self.t_max)
        low = t.floor().long().clamp(max=len(self) - 2)
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]).exp()

    def t(self, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_sigma = sigma.clamp(min=float(self.sigmas[0])).log()
        low = (torch.searchsorted(self.log_sigmas, log_sigma.reshape(-1)) - 1).clamp(
            0, len(self) - 2
        )
        low = low.reshape(log_sigma.shape)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return low + w

    def lcm_timesteps(self, steps: int, original_steps: int = 50) -> Tensor:
        """LCM's inference timesteps: `steps` picks of the skipping-step origin timesteps.

        The origin timesteps are {k*i - 1} for k = T / original_steps (19, 39, ... 999 for
        T = 1000); inference takes indices floor(linspace(0, original_steps, steps, endpoint
        =False)) of the reversed list, so 4 steps give [999, 759, 499, 259].
        """
        if not 1 <= steps <= original_steps:
            raise ScheduleError(f"LCM steps must be in 1..{original_steps}, got {steps}")
        skip = len(self) // original_steps
        origin = torch.arange(1, original_steps + 1) * skip - 1
        picks = torch.floor(torch.arange(steps) * (original_steps / steps)).long()
        return origin.flip(0)[picks]


def lcm_sigmas(schedule: DiscreteVP, steps: int, original_steps: int = 50) -> Tensor:
    """Grid for the `lcm` sampler: the sigmas of LCM's inference timesteps, then 0."""
    t = schedule.lcm_timesteps(steps, original_steps).to(torch.float64)
    return _finish(schedule.sigma(t), True)


def consistency_sigmas(
    indices: list[int],
    grid_points: int = 40,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> Tensor:
    """Grid for `cm_multistep`: chosen points of a Karras grid, then 0.

    Mirrors the `ts` argument of the consistency-models sampler: indices into a Karras
    grid of `grid_points` points, e.g. [0, 22, 39] of 40 (ImageNet-64 CD, 2 steps).
    """
    if not indices or any(b <= a for a, b in itertools.pairwise(indices)):
        raise ScheduleError(f"indices must be a non-empty increasing list, got {indices}")
    if indices[0] < 0 or indices[-1] >= grid_points:
        raise ScheduleError(f"indices must lie in 0..{grid_points - 1}, got {indices}")
    ramp = karras_sigmas(grid_points - 1, sigma_min, sigma_max, rho, final_zero=False)
    return _finish(ramp[indices], True)


def consistency_grid(steps: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """The consistency grid for `steps` steps: picks spread over a 40-point Karras grid
    (indices round(i * 44 / steps), capped at 39, duplicates dropped), then 0."""
    picks = sorted({min(round(i * 44 / steps), 39) for i in range(steps)})
    return consistency_sigmas(picks, 40, sigma_min, sigma_max, rho)


def teleport_sigmas(sigma_max: float, follower: Tensor) -> Tensor:
    """Grid for `teleport`: start at sigma_max, jump to follower[0], then run `follower`."""
    if not float(follower[0]) < sigma_max:
        raise ScheduleError(
            f"the teleport target sigma {float(follower[0])} must be below sigma_max {sigma_max}"
        )
    return torch.cat([torch.tensor([sigma_max], dtype=torch.float64), follower.to(torch.float64)])
