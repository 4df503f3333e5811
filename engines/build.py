"""Model package builders: `fewstep build gaussian` writes model_repo/fashion-gaussian.

The Gaussian package is the per-class Gaussian score approximation of Fashion-MNIST (Wang &
Vastola, TMLR 2024): each class's mean and top covariance eigenpairs give a closed-form
denoiser, a real model that needs no training. The builder fits it on the training split,
measures it on the test split and writes the measurements into the model card.
"""

from __future__ import annotations

import datetime
import math
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from engines.data import FASHION_LABELS, fashion_root, load_fashion_mnist
from engines.denoisers import Denoiser
from engines.gaussian import GaussianStats
from engines.hardware import describe_host
from engines.repository import LoadedModel, Repository

REPORTED_RANKS = (16, 32, 64, 128, 256, 784)
QUALITY_SIGMAS = (0.5, 2.0)
QUALITY_SEED = 0

GAUSSIAN_YAML = """\
# Per-class Gaussian score approximation of Fashion-MNIST (written by `fewstep build gaussian`).
kind: gaussian
description: >-
  Fashion-MNIST 28x28 grey-scale clothing, one class per request; the closed-form denoiser
  of each class's Gaussian (Wang & Vastola 2024). A zero-training reference model.
shape: [1, 28, 28]
data_range: [-1, 1]
labels: [t-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot]
synonyms:
  tshirt: t-shirt/top
  t-shirt: t-shirt/top
  top: t-shirt/top
  tee: t-shirt/top
  trousers: trouser
  pants: trouser
  sweater: pullover
  jumper: pullover
  dresses: dress
  jacket: coat
  sandals: sandal
  shirts: shirt
  sneakers: sneaker
  trainer: sneaker
  trainers: sneaker
  handbag: bag
  purse: bag
  boot: ankle boot
  boots: ankle boot
  ankle-boot: ankle boot
sampling:
  samplers: [dpmpp_2m, dpmpp_3m, dpmpp_2s, unipc, deis, euler, heun, ddpm, dpmpp_sde,
             euler_ancestral]
  default_sampler: dpmpp_2m
  default_steps: 8
  max_steps: 50
  sigma_min: 0.002
  sigma_max: 80.0
  rho: 7.0
  teleport_sigma: 10.0
  default_guidance: 1.0
  max_guidance: 1.0  # no unconditional statistics, so no classifier-free guidance
max_batch_size: 256
max_n: 16
"""


def explained_variance(full: GaussianStats, x: Tensor, y: Tensor, rank: int) -> Tensor:
    """Per class, the share of x's variance about the class mean in the top-`rank` span."""
    flat = x.reshape(len(x), -1).to(torch.float64)
    shares = []
    for c in range(full.classes):
        diff = flat[y == c] - full.mean[c]
        kept = (diff @ full.eigvecs[c, :, :rank]).square().sum()
        shares.append(kept / diff.square().sum())
    return torch.stack(shares)


def truncate(stats: GaussianStats, rank: int, dtype: torch.dtype) -> GaussianStats:
    """The top-`rank` eigenpairs of each class, in `dtype`."""
    return GaussianStats(
        stats.mean.to(dtype),
        stats.eigvals[:, :rank].to(dtype).contiguous(),
        stats.eigvecs[:, :, :rank].to(dtype).contiguous(),
        stats.shape,
        stats.labels,
    )


def denoising_mse(denoiser: Denoiser, x: Tensor, y: Tensor, sigma: float) -> float:
    """Mean squared error per pixel of D(x + sigma * eps, sigma) against x (seeded eps)."""
    g = torch.Generator().manual_seed(QUALITY_SEED)
    noisy = x.to(torch.float64) + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
    x0 = denoiser(noisy, torch.full((len(x),), sigma, dtype=torch.float64), {"label": y})
    return float((x0 - x).square().mean())


def build_gaussian(
    data: str | Path | None = None,
    rank: int = 128,
    out: str | Path = "model_repo/fashion-gaussian",
    version: int = 1,
    log: Callable[[str], None] = print,
) -> LoadedModel:
    """Fit, write, reload and measure the Fashion-MNIST Gaussian package; return the model."""
    start, out = time.perf_counter(), Path(out)
    if version < 1:
        raise ValueError(
            f"version must be a positive integer (a folder 1/, 2/, ...), got {version}"
        )

    def step(message: str) -> None:
        log(f"[{time.perf_counter() - start:6.1f}s] {message}")

    root = fashion_root(data)
    step(f"reading Fashion-MNIST from {root}")
    x_train, y_train = load_fashion_mnist("train", root)
    x_test, y_test = load_fashion_mnist("test", root)
    dim = x_train[0].numel()
    if not 1 <= rank <= dim:
        raise ValueError(f"rank must be in 1..{dim} (pixels per image), got {rank}")
    step(f"fitting per-class mean and covariance of {len(x_train)} training images")
    full = GaussianStats.fit(x_train, y_train, class_names=FASHION_LABELS)
    ranks = sorted({*REPORTED_RANKS, rank})
    step(f"measuring ranks {ranks} on {len(x_test)} test images")
    variance = {r: explained_variance(full, x_test, y_test, r) for r in ranks}
    sigma = QUALITY_SIGMAS[0]
    rank_mse = {
        r: denoising_mse(truncate(full, r, torch.float64).denoiser(), x_test, y_test, sigma)
        for r in ranks
    }
    step(f"rank {rank} keeps {variance[rank].mean():.1%} of the test-set variance")

    folder = out / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    truncate(full, rank, torch.float32).save(folder / "stats.safetensors")
    (out / "model.yaml").write_text(GAUSSIAN_YAML)
    model = Repository(out.parent).load(out.name, version)
    size = (folder / "stats.safetensors").stat().st_size
    step(f"wrote {folder / 'stats.safetensors'} ({size / 1e6:.1f} MB), {model.fingerprint}")

    mse = {s: denoising_mse(model.denoiser, x_test, y_test, s) for s in QUALITY_SIGMAS}
    mean_mse = float((full.mean[y_test].reshape(x_test.shape) - x_test).square().mean())
    for sigma, value in mse.items():
        step(f"test denoising MSE at sigma {sigma}: {value:.4f} (class mean: {mean_mse:.4f})")
    args = ["--data", root, "--rank", rank, "--out", out, "--version", version]
    recipe = shlex.join(["fewstep", "build", "gaussian", *map(str, args)])
    card = _card(
        model, recipe, rank, size, (variance, rank_mse), mse, mean_mse, time.perf_counter() - start
    )
    (folder / "MODEL_CARD.md").write_text(card)
    step(f"wrote {folder / 'MODEL_CARD.md'}")
    return model


def _card(
    model: LoadedModel,
    recipe: str,
    rank: int,
    size: int,
    by_rank: tuple[dict[int, Tensor], dict[int, float]],
    mse: dict[float, float],
    mean_mse: float,
    seconds: float,
) -> str:
    spec, (variance, rank_mse) = model.spec, by_rank
    classes, dim = len(spec.labels), math.prod(spec.shape)
    rank_rows = "\n".join(
        f"| {r} | {v.mean():.3f} | {v.min():.3f} ({spec.labels[int(v.argmin())]}) "
        f"| {rank_mse[r]:.4f} | {classes * (dim + r + dim * r) * 4 / 1e6:.1f} MB |"
        for r, v in sorted(variance.items())
    )
    class_rows = "\n".join(
        f"| {label} | {share:.3f} |"
        for label, share in zip(spec.labels, variance[rank].tolist(), strict=True)
    )
    mse_rows = "\n".join(
        f"| {s} | {m:.4f} | {mean_mse:.4f} | {s * s:.4f} |" for s, m in mse.items()
    )
    today = datetime.date.today().isoformat()
    return f"""# {spec.name} v{spec.version}

The per-class Gaussian score approximation of Fashion-MNIST (Wang & Vastola, "The
Hidden Linear Structure in Score-Based Models and its Application", TMLR 2024): for class c
with mean mu_c and top-{rank} covariance eigenpairs (lam, U), the denoiser is the exact
posterior mean under that Gaussian,

    D(x; sigma, c) = mu_c + U diag(lam / (lam + sigma^2)) U^T (x - mu_c)

A real model with no training: samples look like blurred, textureless members of the
class. It is a reference for the samplers and the service, and the source of the
teleport jump (teleport_sigma 10 in model.yaml).

## Recipe

    {recipe}

## Data

Fashion-MNIST (Xiao et al. 2017, MIT licence) from Debian's `dataset-fashion-mnist`:
statistics from the 60,000 training images (6,000 per class, labels from the data set),
every measurement below on the 10,000 test images. Pixels scaled to [-1, 1].

## Files

`stats.safetensors` ({size / 1e6:.1f} MB, float32, fingerprint `{model.fingerprint}`):
`mean` [10, 784], `eigvals` [10, {rank}], `eigvecs` [10, 784, {rank}]; written with
`GaussianStats.save`, loaded in float64. Directions outside the kept eigenvectors count as
zero variance: the denoiser maps them to the class mean.

## Rank

Held-out explained variance: the share of each test image's deviation from its class mean
(summed over the class) that lies in the span of the top-R training eigenvectors, and the
test denoising MSE at sigma {QUALITY_SIGMAS[0]} (see Quality) with the top-R eigenpairs in float64.
Rank 784 is the full covariance. Rank {rank} was chosen: its file stays well under 10 MB
and its MSE is {rank_mse[rank] - rank_mse[max(rank_mse)]:.4f} above the full covariance's.

| rank | mean explained variance | worst class | MSE, sigma {QUALITY_SIGMAS[0]} | size |
|---|---|---|---|---|
{rank_rows}

At rank {rank}, per class:

| label | explained variance |
|---|---|
{class_rows}

## Quality

Denoising MSE per pixel (data range [-1, 1]) on the 10,000 test images, x + sigma * eps
with eps seeded {QUALITY_SEED}, the true class given. References: returning the class mean
(ignores the noisy image) and returning the noisy image (error sigma^2).

| sigma | closed-form D | class mean | noisy input |
|---|---|---|---|
{mse_rows}

## Limits

Only one class per request and no classifier-free guidance (max_guidance 1.0). Samples
have the class's second-order statistics and nothing more: no sharp edges, no textures,
no multimodality within a class.

## Build

{describe_host()}; {seconds:.0f} s wall time; {today}.
"""
