"""Closed-form Gaussian-mixture data: exact denoiser, raw VP networks, exact flow.

A mixture sum_k pi_k N(mu_k, Sigma_k) has an exact EDM denoiser

    D(x; sigma) = sum_k r_k(x) [mu_k + Sigma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k)],
    r_k(x) proportional to pi_k N(x; mu_k, Sigma_k + sigma^2 I),

so samplers can be measured against the exact probability-flow solution with no trained
network: the single-Gaussian flow in closed form, a mixture's by a tight ODE solve.
It serves the tests, `fewstep bench samplers` and the quality harness.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from engines.denoisers import Cond, expand
from engines.schedules import VPSchedule, edm_to_vp


class GaussianMixture:
    """A Gaussian mixture in D dimensions with full covariances (float64)."""

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        self.eigvals, self.eigvecs = torch.linalg.eigh(covs)
        self.eigvals = self.eigvals.clamp(min=0)
        self.covs = covs

    @classmethod
    def random(
        cls, dim: int, components: int, seed: int = 0, spread: float = 2.0
    ) -> GaussianMixture:
        """A reproducible random mixture with well-separated means and anisotropic covariances."""
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(components, dim, generator=g, dtype=torch.float64)
        a = torch.randn(components, dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
        covs = 0.25 * (a @ a.transpose(1, 2)) + 0.01 * torch.eye(dim, dtype=torch.float64)
        weights = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
        return cls(weights / weights.sum(), means, covs)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        root = self.eigvecs * self.eigvals.sqrt()[:, None, :]
        return self.means[comp] + (root[comp] @ z[:, :, None])[:, :, 0]

    def moments(self) -> tuple[Tensor, Tensor]:
        """Mean and covariance of the whole mixture (its Gaussian approximation)."""
        mean = (self.weights[:, None] * self.means).sum(0)
        centred = self.means - mean
        cov = (
            self.weights[:, None, None] * (self.covs + centred[:, :, None] * centred[:, None, :])
        ).sum(0)
        return mean, cov

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        """Exact E[x0 | x_sigma] in EDM coordinates; x [B, D], sigma [B].

        Written with elementwise products and sums over fixed-size axes, so a row's result
        is bitwise the same whatever else is in the batch.
        """
        x64 = x.to(torch.float64)
        s2 = sigma.to(torch.float64)[:, None, None] ** 2  # [B, 1, 1]
        diff = x64[:, None, :] - self.means[None]  # [B, K, D]
        proj = (self.eigvecs[None] * diff[:, :, :, None]).sum(2)  # [B, K, D] in eigenbasis
        var = self.eigvals[None] + s2  # [B, K, D]
        log_r = torch.log(self.weights)[None] - 0.5 * ((proj**2 / var).sum(2) + var.log().sum(2))
        r = torch.softmax(log_r, dim=1)  # [B, K]
        shrunk = self.eigvals[None] / var * proj
        comp = self.means[None] + (self.eigvecs[None] * shrunk[:, :, None, :]).sum(3)
        return (r[:, :, None] * comp).sum(1).to(x.dtype)

    def denoiser(self) -> Callable[[Tensor, Tensor, Cond], Tensor]:
        """This mixture as a denoiser D(x, sigma, cond) in EDM coordinates."""

        def mixture_denoiser(x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
            return self.denoise(x, sigma)

        return mixture_denoiser

    def vp_net(self, schedule: VPSchedule, prediction: str = "eps") -> Callable[..., Tensor]:
        """A raw VP 'network' net(x_vp, t, cond) that predicts eps, v or x0 exactly."""

        def net(x_vp: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
            sigma = schedule.sigma(t.to(torch.float64))
            alpha, sigma_vp = (expand(v, x_vp).to(torch.float64) for v in edm_to_vp(sigma))
            x = x_vp.to(torch.float64) / alpha
            x0 = self.denoise(x, sigma)
            eps = (x - x0) / expand(sigma, x)
            out = {"eps": eps, "x0": x0, "v": alpha * eps - sigma_vp * x0}[prediction]
            return out.to(x_vp.dtype)

        return net

    def flow(self, x: Tensor, sigma_from: float, sigma_to: float, rtol: float = 1e-11) -> Tensor:
        """The probability-flow ODE solution from sigma_from to sigma_to (> 0 or 0).

        Solved in log sigma with DOP853; to reach sigma 0 it integrates to 1e-5 * sigma_from
        (or less) and then applies the exact denoiser there.
        """
        end = sigma_to if sigma_to > 0 else min(1e-6, 1e-5 * sigma_from)
        shape = x.shape

        def rhs(u: float, y: np.ndarray) -> np.ndarray:
            xt = torch.from_numpy(y).reshape(shape)
            s = torch.full((shape[0],), math.exp(u), dtype=torch.float64)
            return (xt - self.denoise(xt, s)).reshape(-1).numpy()

        y0 = x.to(torch.float64).reshape(-1).numpy()
        sol = solve_ivp(
            rhs, (math.log(sigma_from), math.log(end)), y0, method="DOP853", rtol=rtol, atol=1e-12
        )
        out = torch.from_numpy(sol.y[:, -1]).reshape(shape)
        if sigma_to == 0:
            out = self.denoise(out, torch.full((shape[0],), end, dtype=torch.float64))
        return out
