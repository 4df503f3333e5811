"""`fewstep train edm-teacher`: an EDM teacher (Karras et al. 2022) on Fashion-MNIST.

Loss: lambda(sigma) |D(x + sigma n, sigma, c) - x|^2 with ln sigma ~ N(p_mean, p_std^2) and
lambda = (sigma^2 + sd^2) / (sigma sd)^2; EMA of the weights; the label is replaced by
the null label with probability `label_dropout` so one network also serves the
unconditional score that classifier-free guidance needs. The package also holds the
per-class Gaussian statistics that `teleport` jumps with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from engines.data import FASHION_LABELS
from engines.denoisers import EDMDenoiser
from engines.gaussian import GaussianStats
from engines.nets import UNet, UNetConfig
from engines.training import common, package


@dataclasses.dataclass
class EDMSettings:
    """What makes this recipe an EDM teacher recipe (on top of RunConfig)."""

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    label_dropout: float = 0.1
    ema: float = 0.999
    teleport_rank: int = 128
    teleport_sigma: float = 10.0


def edm_loss(
    denoiser: EDMDenoiser, x: Tensor, cond: dict, s: EDMSettings, gen: torch.Generator
) -> Tensor:
    """EDM's weighted denoising loss for one batch, noise from `gen`."""
    device = x.device
    sigma = (common.randn((len(x),), gen, device) * s.p_std + s.p_mean).exp()
    noise = common.randn(x.shape, gen, device)
    weight = (sigma**2 + s.sigma_data**2) / (sigma * s.sigma_data) ** 2
    x0 = denoiser(x + noise * sigma[:, None, None, None], sigma, cond)
    return (weight[:, None, None, None] * (x0 - x).square()).mean()


def drop_labels(y: Tensor, p: float, null: int, gen: torch.Generator) -> Tensor:
    keep = torch.rand(len(y), generator=gen) >= p
    return torch.where(keep.to(y.device), y, torch.full_like(y, null))


def train_edm(
    x: Tensor,
    y: Tensor,
    run: common.RunConfig,
    net_cfg: UNetConfig,
    s: EDMSettings,
    log: common.Log = print,
) -> tuple[UNet, float]:
    """Train on (x, y) (data space or latents); return the EMA network and seconds."""
    torch.manual_seed(run.seed)
    net = UNet(net_cfg).to(run.device)
    ema = common.frozen_copy(net)
    opt = torch.optim.Adam(net.parameters(), lr=run.lr)
    denoiser = EDMDenoiser(net, s.sigma_data)
    log(f"UNet {common.count_params(net) / 1e6:.2f}M parameters, {len(x)} training examples")

    def step(i: int) -> float:
        idx = common.batch_indices(len(x), run.batch, run.seed, i)
        gen = common.step_generator(run.seed, i)
        xb = x[idx].to(run.device)
        labels = drop_labels(y[idx], s.label_dropout, net_cfg.classes, gen).to(run.device)
        common.warmup_lr(opt, run.lr, i)
        with common.autocast(run):
            loss = edm_loss(denoiser, xb, {"label": labels}, s, gen)
        return common.teacher_update(loss, opt, net, ema, s.ema, i)

    seconds = common.train_loop(run, step, {"net": net, "ema": ema, "opt": opt}, log)
    return ema, seconds


def run(
    run_cfg: common.RunConfig, net_cfg: UNetConfig, s: EDMSettings, log: common.Log = print
) -> Path:
    """The whole recipe: train, fit teleport statistics, write the package."""
    x, y = common.training_data(run_cfg)
    ema, seconds = train_edm(x, y, run_cfg, net_cfg, s, log)
    log(f"fitting per-class Gaussian statistics (rank {s.teleport_rank}) for teleport")
    stats = GaussianStats.fit(x, y, rank=s.teleport_rank, class_names=FASHION_LABELS)
    return package.write(
        package.Package(
            kind="edm",
            run=run_cfg,
            network=net_cfg,
            sigma_data=s.sigma_data,
            weights={"weights.safetensors": ema},
            stats=stats,
            teleport_sigma=s.teleport_sigma,
            settings=(s,),
            seconds=seconds,
            examples=len(x),
        ),
        log,
    )
