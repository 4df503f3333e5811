"""Wrappers that turn a raw network into the one denoiser contract D(x, sigma, cond) -> x0.

x is [B, ...] in EDM (variance-exploding) coordinates, sigma is a [B] tensor of EDM noise
levels (one per row), cond is a dict of per-row tensors (or None). Every parameterisation
-- eps / v / x0 prediction on a VP schedule, EDM preconditioning, consistency and LCM
boundary scalings, flow-matching velocity -- is converted here and nowhere else; samplers
only ever see x0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from engines.schedules import DiscreteVP, VPSchedule, edm_to_vp

Cond = dict[str, Tensor] | None
Net = Callable[..., Tensor]


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor: ...


def expand(v: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-row [B] tensor against x of shape [B, ...]."""
    return as_dtype(v, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def as_dtype(v: Tensor, dtype: torch.dtype) -> Tensor:
    """v.to(dtype), without the call where v has it already: what `.to` returns then (v
    itself), less a dispatch through torch (a few us; a pass makes several)."""
    return v if v.dtype == dtype else v.to(dtype)


PREDICTIONS = ("eps", "v", "x0")


class VPDenoiser:
    """eps-, v- or x0-prediction network on a VP schedule, continuous or discrete time.

    The network is called as net(x_vp, t, cond) with x_vp = alpha * x and t the schedule's
    own time for each row's sigma (a fractional timestep for discrete schedules).
    """

    def __init__(self, net: Net, schedule: VPSchedule, prediction: str = "eps") -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.net, self.schedule, self.prediction = net, schedule, prediction

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        alpha, sigma_vp = (expand(v, x) for v in edm_to_vp(sigma.to(torch.float64)))
        t = self.schedule.t(sigma.to(torch.float64)).to(x.dtype)
        x_vp = x * alpha
        out = self.net(x_vp, t, cond)
        if self.prediction == "eps":
            return x - expand(sigma, x) * out
        if self.prediction == "v":
            return alpha * x_vp - sigma_vp * out
        return out


class EDMDenoiser:
    """EDM preconditioning (Karras et al. 2022): D = c_skip x + c_out F(c_in x, c_noise)."""

    def __init__(self, net: Net, sigma_data: float = 0.5) -> None:
        self.net, self.sigma_data = net, sigma_data

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2  # sigma^2 + sigma_data^2 and its root, each computed once
        root = torch.sqrt(total)
        c_skip = sd2 / total
        c_out = sigma * self.sigma_data / root
        c_in = 1 / root
        return c_skip, c_out, c_in

    def c_noise(self, sigma: Tensor) -> Tensor:
        return sigma.log() / 4

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        c_skip, c_out, c_in = (expand(c, x) for c in self.scalings(sigma))
        return c_skip * x + c_out * self.net(x * c_in, as_dtype(self.c_noise(sigma), x.dtype), cond)


class ConsistencyDenoiser(EDMDenoiser):
    """Consistency-model boundary scalings (Song et al. 2023), so f(x, sigma_min) = x.

    c_noise follows openai/consistency_models: 1000 * log(sigma + 1e-44) / 4.
    """

    def __init__(self, net: Net, sigma_data: float = 0.5, sigma_min: float = 0.002) -> None:
        super().__init__(net, sigma_data)
        self.sigma_min = sigma_min

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        shifted = sigma - self.sigma_min
        root = torch.sqrt(sigma**2 + sd2)
        c_skip = sd2 / (shifted**2 + sd2)
        c_out = shifted * self.sigma_data / root
        c_in = 1 / root
        return c_skip, c_out, c_in

    def c_noise(self, sigma: Tensor) -> Tensor:
        return 250 * torch.log(sigma + 1e-44)


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """LCM's sinusoidal embedding of w (Luo et al. 2023), fed to the UNet as timestep_cond."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float64, device=w.device)
    freqs = torch.exp(steps * -(math.log(10000.0) / (half - 1)))
    angles = (w.to(torch.float64) * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class LCMDenoiser:
    """Latent consistency model on a discrete VP schedule, with LCM's boundary scalings.

    The network predicts eps (or v / x0) at the discrete timestep t; the consistency
    function is c_skip x_vp + c_out x0_hat with c_skip = sd^2 / ((s t)^2 + sd^2) and
    c_out = s t / sqrt((s t)^2 + sd^2), s = timestep_scaling. When embedding_dim is set,
    cond["guidance_scale"] (w + 1, per row) becomes cond["w_embedding"] for the network.
    """

    def __init__(
        self,
        net: Net,
        schedule: DiscreteVP,
        prediction: str = "eps",
        timestep_scaling: float = 10.0,
        sigma_data: float = 0.5,
        embedding_dim: int | None = None,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.net, self.schedule, self.prediction = net, schedule, prediction
        self.timestep_scaling, self.sigma_data = timestep_scaling, sigma_data
        self.embedding_dim = embedding_dim

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        alpha, sigma_vp = (expand(v, x) for v in edm_to_vp(sigma.to(torch.float64)))
        # discrete schedules keep their tables on the CPU
        t = self.schedule.t(sigma.detach().cpu().to(torch.float64)).to(x.device)
        x_vp = x * alpha
        if self.embedding_dim is not None:
            if cond is None or "guidance_scale" not in cond:
                raise ValueError("this LCM needs cond['guidance_scale'] (one value per row)")
            w_emb = guidance_embedding(cond["guidance_scale"] - 1, self.embedding_dim)
            cond = {**cond, "w_embedding": w_emb.to(x.dtype)}
        out = self.net(x_vp, t.to(x.dtype), cond)
        if self.prediction == "eps":
            x0 = (x_vp - sigma_vp * out) / alpha
        elif self.prediction == "v":
            x0 = alpha * x_vp - sigma_vp * out
        else:
            x0 = out
        scaled = expand(t * self.timestep_scaling, x)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (scaled**2 + sd2)
        c_out = scaled / torch.sqrt(scaled**2 + sd2)
        return c_out * x0 + c_skip * x_vp


class DiscreteTimeEDM:
    """An EDM denoiser seen as an x0-prediction network on a discrete VP schedule.

    Called as net(x_vp, t, cond) (what LCMDenoiser calls with prediction="x0"), it
    evaluates the EDM denoiser at sigma(t): an LCM student can then start as an exact copy
    of its EDM-preconditioned teacher.
    """

    def __init__(self, edm: Denoiser, schedule: VPSchedule) -> None:
        self.edm, self.schedule = edm, schedule

    def __call__(self, x_vp: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        sigma = self.schedule.sigma(t.detach().cpu().to(torch.float64)).to(x_vp.device)
        alpha = expand(1 / torch.sqrt(1 + sigma**2), x_vp)
        return self.edm(x_vp / alpha, sigma.to(x_vp.dtype), cond)


class FlowDenoiser:
    """Rectified-flow / flow-matching velocity model: x_t = (1 - t) x0 + t eps, v = eps - x0.

    EDM sigma = t / (1 - t); the network is called as net(x_t, t, cond).
    """

    def __init__(self, net: Net) -> None:
        self.net = net

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        t64 = sigma.to(torch.float64) / (1 + sigma.to(torch.float64))
        t = expand(t64, x)
        x_t = x * (1 - t)
        return x_t - t * self.net(x_t, t64.to(x.dtype), cond)


class Guided(NamedTuple):
    """What a CFG++ denoiser returns: the guided x0 and the unconditional x0, per row."""

    x0: Tensor
    x0_uncond: Tensor


class CFGDenoiser:
    """Classifier-free guidance: conditional and unconditional rows in one forward pass.

    cond["label"] holds class ids, cond["guidance_scale"] the per-row scale w, and
    x0 = x0_uncond + w (x0_cond - x0_uncond). Rows with w == 1 need no unconditional row,
    so they add nothing to the batch. The unconditional rows use `null_label`.

    With cfg_pp (CFG++, Chung et al. 2024) every row also gets its unconditional x0 and
    the result is a Guided pair for the `euler_cfgpp` sampler; w is then CFG++'s lambda,
    usually in [0, 1].
    """

    def __init__(self, inner: Denoiser, null_label: int, cfg_pp: bool = False) -> None:
        self.inner, self.null_label, self.cfg_pp = inner, null_label, cfg_pp

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor | Guided:
        if cond is None or "guidance_scale" not in cond:
            if self.cfg_pp:
                raise ValueError("CFG++ needs cond['label'] and cond['guidance_scale'] per row")
            return self.inner(x, sigma, cond)
        scale = cond["guidance_scale"]
        guided = torch.arange(len(x)) if self.cfg_pp else (scale != 1).nonzero().flatten()
        if len(guided) == 0:
            return self.inner(x, sigma, cond)
        uncond = {k: v[guided] for k, v in cond.items()}
        uncond["label"] = torch.full_like(cond["label"][guided], self.null_label)
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        x0 = self.inner(torch.cat([x, x[guided]]), torch.cat([sigma, sigma[guided]]), both)
        x0_cond, x0_uncond = x0[: len(x)], x0[len(x) :]
        w = expand(scale[guided], x0_uncond)
        out = x0_cond.clone()
        out[guided] = x0_uncond + w * (x0_cond[guided] - x0_uncond)
        return Guided(out, x0_uncond) if self.cfg_pp else out
