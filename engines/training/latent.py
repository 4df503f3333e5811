"""`fewstep train autoencoder` and `fewstep train lcm-teacher`: the latent-space pair.

The autoencoder maps 28x28 images to 4x7x7 latents (L1 + L2 reconstruction, a small
latent penalty); its scale factor is set afterwards to 1 / std of the training latents,
so the latent teacher sees unit-variance data (sigma_data 1). The latent teacher is the
EDM recipe on those latents; its package carries the autoencoder and decodes samples.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from engines.data import FASHION_LABELS, fashion_root, load_fashion_mnist
from engines.gaussian import GaussianStats
from engines.nets import Autoencoder, AutoencoderConfig, config_from_dict, config_to_dict
from engines.nets.autoencoder import reconstruction_loss
from engines.training import common, edm, package

AE_FILE, AE_YAML = "autoencoder.safetensors", "autoencoder.yaml"


def load_autoencoder(folder: str | Path) -> Autoencoder:
    folder = Path(folder)
    if not (folder / AE_YAML).is_file():
        raise FileNotFoundError(
            f"{folder / AE_YAML} not found; "
            f"train it with `fewstep train autoencoder --out {folder}`"
        )
    raw = yaml.safe_load((folder / AE_YAML).read_text())
    config = config_from_dict(AutoencoderConfig, raw)
    model = Autoencoder(config)
    model.load_state_dict(load_file(str(folder / AE_FILE)))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(ae: Autoencoder, x: torch.Tensor, device: str) -> torch.Tensor:
    ae = ae.to(device)
    return torch.cat([ae.encode(b.to(device)).cpu() for b in common.iterate(x, 1000)])


def run_autoencoder(run_cfg: common.RunConfig, log: common.Log = print) -> Path:
    x, _ = common.training_data(run_cfg)
    torch.manual_seed(run_cfg.seed)
    model = Autoencoder(AutoencoderConfig()).to(run_cfg.device)
    opt = torch.optim.Adam(model.parameters(), lr=run_cfg.lr)
    log(f"autoencoder {common.count_params(model) / 1e6:.2f}M parameters, {len(x)} images")

    def step(i: int) -> float:
        xb = x[common.batch_indices(len(x), run_cfg.batch, run_cfg.seed, i)].to(run_cfg.device)
        common.warmup_lr(opt, run_cfg.lr, i)
        loss = reconstruction_loss(model, xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    seconds = common.train_loop(run_cfg, step, {"model": model, "opt": opt}, log)
    model.eval()
    latents = encode_all(model, x, run_cfg.device)
    scale = 1.0 / float(latents.std())
    config = dataclasses.replace(model.config, scale=scale)
    x_test, _ = load_fashion_mnist("test", fashion_root(run_cfg.data))
    with torch.no_grad():
        recon = torch.cat([model(b.to(run_cfg.device)).cpu() for b in common.iterate(x_test, 1000)])
    mse = float((recon - x_test).square().mean())
    out = Path(run_cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    common.save_weights(model, out / AE_FILE)
    (out / AE_YAML).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    (out / "NOTES.md").write_text(
        f"autoencoder: `{common.command_line(run_cfg)}`; test reconstruction MSE {mse:.5f} "
        f"(data in [-1, 1]); latent scale {scale:.4f}; {seconds / 60:.1f} min on "
        f"{common.hardware(run_cfg)}; {datetime.date.today().isoformat()}\n"
    )
    log(f"test reconstruction MSE {mse:.5f}, latent scale {scale:.4f}; wrote {out}")
    return out


def run_teacher(run_cfg: common.RunConfig, net_cfg, ae_dir: str, log: common.Log = print) -> Path:
    ae = load_autoencoder(ae_dir)
    x, y = common.training_data(run_cfg)
    z = encode_all(ae, x, run_cfg.device)
    log(f"latents {tuple(z.shape[1:])}, std {float(z.std()):.3f}")
    settings = edm.EDMSettings(sigma_data=1.0, teleport_sigma=5.0)
    ema, seconds = edm.train_edm(z, y, run_cfg, net_cfg, settings, log)
    stats = GaussianStats.fit(z, y, rank=None, class_names=FASHION_LABELS)
    return package.write(
        package.Package(
            kind="edm",
            run=run_cfg,
            network=net_cfg,
            sigma_data=settings.sigma_data,
            weights={"weights.safetensors": ema, "autoencoder.safetensors": ae},
            stats=stats,
            teleport_sigma=settings.teleport_sigma,
            autoencoder=ae.config,
            shape=tuple(z.shape[1:]),
            settings=(settings,),
            seconds=seconds,
            examples=len(x),
            notes=f"\nLatent teacher: EDM in the latent space of the autoencoder `{ae_dir}`.\n",
        ),
        log,
    )
