"""Deterministic probability-flow ODE samplers, in EDM coordinates (lambda = -log sigma)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from engines.denoisers import Guided
from engines.noise import RowNoise
from engines.samplers.base import SamplerError, SamplerGen, lambda_of, register


def _order(i: int, steps: int, order: int, sigma_next: float, shorten: bool) -> int:
    """Order of multistep step i: warm-up from 1, first order into sigma = 0, and with
    `shorten` never more than the steps left (diffusers' lower_order_final)."""
    if sigma_next == 0:
        return 1
    return min(order, i + 1, steps - i) if shorten else min(order, i + 1)


def _check_order(name: str, order: int, allowed: tuple[int, ...]) -> None:
    if order not in allowed:
        raise SamplerError(f"{name} order must be one of {allowed}, got {order!r}")


@register(family="ode")
def euler(x: Tensor, sigmas: Tensor, noise: RowNoise) -> SamplerGen:
    """Euler on the PF-ODE = DDIM with eta 0 (Song et al. 2021; Karras et al. 2022)."""
    levels = sigmas.tolist()  # floats: a tensor index costs ~1 us
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = yield x, sigma
        x = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * denoised
    return x


@register(family="ode", guided=True)
def euler_cfgpp(x: Tensor, sigmas: Tensor, noise: RowNoise) -> SamplerGen:
    """DDIM with CFG++ (Chung et al. 2024): guided x0, re-noised along the unconditional eps."""
    levels = sigmas.tolist()  # floats: a tensor index costs ~1 us
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        out = yield x, sigma
        if not isinstance(out, Guided):
            raise SamplerError("euler_cfgpp needs a CFGDenoiser(..., cfg_pp=True) denoiser")
        x = out.x0 + (sigma_next / sigma) * (x - out.x0_uncond)
    return x


@register(family="ode", evals_per_step=2)
def heun(
    x: Tensor,
    sigmas: Tensor,
    noise: RowNoise,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> SamplerGen:
    """EDM's Heun sampler with optional churn, Algorithm 2 of Karras et al. 2022."""
    if s_churn < 0:
        raise SamplerError(f"heun s_churn must be >= 0, got {s_churn}")
    steps = len(sigmas) - 1
    levels = sigmas.tolist()  # floats: a tensor index costs ~1 us
    for i in range(steps):
        sigma, sigma_next = levels[i], levels[i + 1]
        gamma = min(s_churn / steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + noise.like(x) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        denoised = yield x, sigma_hat
        d = (x - denoised) / sigma_hat
        x_euler = x + (sigma_next - sigma_hat) * d
        if sigma_next == 0:
            x = x_euler
            continue
        denoised_next = yield x_euler, sigma_next
        d_next = (x_euler - denoised_next) / sigma_next
        x = x + (sigma_next - sigma_hat) * (d + d_next) / 2
    return x


def _dpmpp_update(
    x: Tensor,
    sigma: float,
    sigma_next: float,
    ms: list,
    lams: list,
    order: int,
    d2_weight: float = 2.0,
):
    """One DPM-Solver++ multistep update (Lu et al. 2022), data prediction, VE form.

    ms and lams hold x0 estimates and lambdas, newest first; order 2 is the midpoint form.
    For order 3, d2 is the second divided difference, i.e. h^2 x0''/2, while phi3 is the
    weight of h^2 x0'': the third-order step needs 2 * phi3 * d2 (d2_weight 2). The
    reference implementations (official DPM-Solver, diffusers, k-diffusion) use weight 1,
    which leaves an O(h^3) local error and makes their 3M second order.
    """
    h = lambda_of(sigma_next) - lams[0]
    phi1 = -math.expm1(-h)  # 1 when sigma_next = 0 (h = inf)
    # scalar coefficients folded into fused adds: each op on a request's few rows costs
    # its dispatch more than its arithmetic, and a step runs for every request
    x_next = torch.mul(x, sigma_next / sigma).add_(ms[0], alpha=phi1)
    if order == 1:
        return x_next
    r0 = (lams[0] - lams[1]) / h
    if order == 2:
        return x_next.add_(ms[0] - ms[1], alpha=0.5 * phi1 / r0)
    d1_0 = (ms[0] - ms[1]) / r0
    r1 = (lams[1] - lams[2]) / h
    d1_1 = (ms[1] - ms[2]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi2 = -phi1 / h + 1
    phi3 = (-phi1 + h) / h**2 - 0.5
    return x_next + phi2 * d1 - d2_weight * phi3 * d2


def _dpmpp_multistep(x, sigmas, order, lower_order_final, d2_weight=2.0, orders=None):
    steps = len(sigmas) - 1
    shorten = lower_order_final and steps < 15
    ms: list[Tensor] = []
    lams: list[float] = []
    levels = sigmas.tolist()  # floats: a tensor index costs ~1 us
    for i in range(steps):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = yield x, sigma
        ms, lams = [denoised, *ms][:order], [lambda_of(sigma), *lams][:order]
        this_order = orders[i] if orders else _order(i, steps, order, sigma_next, shorten)
        x = _dpmpp_update(x, sigma, sigma_next, ms, lams, this_order, d2_weight)
    return x


@register(family="ode", min_steps=2, max_order=2)
def dpmpp_2m(
    x: Tensor,
    sigmas: Tensor,
    noise: RowNoise,
    lower_order_final: bool = True,
    orders: Sequence[int] | None = None,
) -> SamplerGen:
    """DPM-Solver++(2M), Lu et al. 2022 (diffusers' lower_order_final below 15 steps).

    orders: the order of each step (base.check_orders), in place of the default schedule.
    """
    return (yield from _dpmpp_multistep(x, sigmas, 2, lower_order_final, orders=orders))


@register(family="ode", min_steps=3)
def dpmpp_3m(
    x: Tensor,
    sigmas: Tensor,
    noise: RowNoise,
    lower_order_final: bool = True,
    legacy_d2: bool = False,
) -> SamplerGen:
    """DPM-Solver++(3M), Lu et al. 2022, with the third-order weight on the second difference.

    legacy_d2=True reproduces diffusers / k-diffusion / the official code (second order).
    """
    return (yield from _dpmpp_multistep(x, sigmas, 3, lower_order_final, 1.0 if legacy_d2 else 2.0))


@register(family="ode", evals_per_step=2)
def dpmpp_2s(x: Tensor, sigmas: Tensor, noise: RowNoise) -> SamplerGen:
    """DPM-Solver++(2S), singlestep with the midpoint in lambda, Lu et al. 2022."""
    levels = sigmas.tolist()  # floats: a tensor index costs ~1 us
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = yield x, sigma
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        sigma_mid = math.sqrt(sigma * sigma_next)
        u = (sigma_mid / sigma) * x - math.expm1(-h / 2) * denoised
        denoised_mid = yield u, sigma_mid
        x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_mid
    return x


def _unipc_update(x, sigma, sigma_next, m0, past, lam0, order, variant, m_next=None):
    """UniP (m_next None) or UniC (m_next given) update of Zhao et al. 2023, bh1/bh2.

    past holds (lambda, x0) of earlier points, newest first; the corrector uses the
    model output at the predicted point, which the next step needs anyway.
    """
    x_base = (sigma_next / sigma) * x - (math.expm1(-(lambda_of(sigma_next) - lam0))) * m0
    if order == 1 and m_next is None:
        return x_base
    hh = -(lambda_of(sigma_next) - lam0)
    rks = [(lam - lam0) / -hh for lam, _ in past[: order - 1]] + [1.0]
    d1s = [(m - m0) / r for (_, m), r in zip(past[: order - 1], rks, strict=False)]
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k, factorial = math.expm1(hh) / hh - 1, 1
    R, b = [], []
    for i in range(1, order + 1):
        R.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R64, b64 = torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if m_next is None:
        rhos = [0.5] if order == 2 else torch.linalg.solve(R64[:-1, :-1], b64[:-1]).tolist()
        return x_base - b_h * sum(rho * d for rho, d in zip(rhos, d1s, strict=True))
    rhos = [0.5] if order == 1 else torch.linalg.solve(R64, b64).tolist()
    res = sum((rho * d for rho, d in zip(rhos[:-1], d1s, strict=True)), torch.zeros_like(x))
    return x_base - b_h * (res + rhos[-1] * (m_next - m0))


@register(family="ode", min_steps=lambda opts: opts.get("order", 2), max_order=3)
def unipc(
    x: Tensor,
    sigmas: Tensor,
    noise: RowNoise,
    order: int = 2,
    variant: str = "bh2",
    corrector: bool = True,
    lower_order_final: bool = True,
    orders: Sequence[int] | None = None,
) -> SamplerGen:
    """UniPC, Zhao et al. 2023: UniP-p predictor plus the UniC corrector at no extra NFE.

    orders: the predictor order of each step (base.check_orders), in place of `order` and
    lower_order_final; the corrector of a step has the order of the step it corrects.
    """
    _check_order("unipc", order, (1, 2, 3))
    if variant not in ("bh1", "bh2"):
        raise SamplerError(f"unipc variant must be 'bh1' or 'bh2', got {variant!r}")
    steps = len(sigmas) - 1
    keep = max(orders) if orders else order
    history: list[tuple[float, Tensor]] = []  # (lambda, x0), newest first
    x_last, last_order = None, 0
    levels = sigmas.tolist()  # floats: a tensor index costs ~1 us
    for i in range(steps):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = yield x, sigma
        if corrector and x_last is not None:
            lam0, m0 = history[0]
            x = _unipc_update(
                x_last,
                levels[i - 1],
                sigma,
                m0,
                history[1:],
                lam0,
                last_order,
                variant,
                denoised,
            )
        history = [(lambda_of(sigma), denoised), *history][:keep]
        this_order = orders[i] if orders else _order(i, steps, order, sigma_next, lower_order_final)
        x_last, last_order = x, this_order
        x = _unipc_update(
            x, sigma, sigma_next, denoised, history[1:], history[0][0], this_order, variant
        )
    return x


def _deis_ind(t: float, b: float, c: float) -> float:
    """Integral of the log-rho Lagrange basis (DEIS tAB, Zhang & Chen 2023)."""
    return t * (math.log(t) - math.log(c) - 1) / (math.log(b) - math.log(c))


@register(family="ode", min_steps=lambda opts: opts.get("order", 2))
def deis(
    x: Tensor, sigmas: Tensor, noise: RowNoise, order: int = 2, lower_order_final: bool = True
) -> SamplerGen:
    """DEIS multistep in log-rho (Zhang & Chen 2023), 2nd order, eps form in EDM coordinates."""
    _check_order("deis", order, (1, 2))
    steps = len(sigmas) - 1
    shorten = lower_order_final and steps < 15
    eps_last, sigma_last = None, None
    levels = sigmas.tolist()  # floats: a tensor index costs ~1 us
    for i in range(steps):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = yield x, sigma
        eps = (x - denoised) / sigma
        if _order(i, steps, order, sigma_next, shorten) == 1:
            x_next = x + (sigma_next - sigma) * eps
        else:
            coef1 = _deis_ind(sigma_next, sigma, sigma_last) - _deis_ind(sigma, sigma, sigma_last)
            coef2 = _deis_ind(sigma_next, sigma_last, sigma) - _deis_ind(sigma, sigma_last, sigma)
            x_next = x + coef1 * eps + coef2 * eps_last
        eps_last, sigma_last, x = eps, sigma, x_next
    return x
