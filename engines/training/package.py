"""Writes a trained model as a model_repo package: model.yaml, weights, statistics, card."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import torch
import yaml
from torch import nn

from engines.build import GAUSSIAN_YAML, truncate
from engines.data import FASHION_LABELS
from engines.gaussian import GaussianStats
from engines.nets import AutoencoderConfig, UNetConfig, config_to_dict
from engines.repository import Repository
from engines.runtimes.select import FASTEST_FIRST
from engines.training import common

ODE_SAMPLERS = ["dpmpp_2m", "dpmpp_3m", "dpmpp_2s", "unipc", "deis", "euler", "heun", "ddpm"]
ODE_SAMPLERS += ["dpmpp_sde", "euler_ancestral"]
DESCRIPTIONS = {
    "edm": "Fashion-MNIST 28x28 grey-scale clothing, one class per request; an EDM teacher "
    "UNet (Karras et al. 2022) with classifier-free guidance, for ODE and SDE samplers.",
    "cm": "Fashion-MNIST 28x28 grey-scale clothing, one class per request; a consistency "
    "model distilled from the EDM teacher (Song et al. 2023), 1 to 4 steps.",
    "lcm": "Fashion-MNIST 28x28 grey-scale clothing, one class per request; a latent "
    "consistency model (Luo et al. 2023) on 4x7x7 autoencoder latents with guidance built in.",
}


@dataclasses.dataclass
class Package:
    """Everything a recipe hands over to be written."""

    kind: str
    run: common.RunConfig
    network: UNetConfig
    sigma_data: float
    weights: dict[str, nn.Module]
    settings: tuple[object, ...]
    seconds: float
    examples: int
    stats: GaussianStats | None = None
    teleport_sigma: float | None = None
    autoencoder: AutoencoderConfig | None = None
    schedule: object | None = None  # LatentConsistency for kind lcm
    shape: tuple[int, ...] = (1, 28, 28)
    notes: str = ""


def model_yaml(p: Package) -> dict:
    synonyms = yaml.safe_load(GAUSSIAN_YAML)["synonyms"]
    if p.kind == "edm":
        sampling = {
            "samplers": ODE_SAMPLERS,
            "default_sampler": "dpmpp_2m",
            "default_steps": 10,
            "max_steps": 100,
            "sigma_min": 0.002,
            "sigma_max": 80.0,
            "rho": 7.0,
            "teleport_sigma": p.teleport_sigma if p.stats is not None else None,
            "default_guidance": 1.0,
            "max_guidance": 8.0,
        }
    elif p.kind == "cm":
        sampling = {
            "samplers": ["cm_multistep"],
            "default_sampler": "cm_multistep",
            "default_steps": 2,
            "max_steps": 8,
            "sigma_min": 0.002,
            "sigma_max": 80.0,
            "rho": 7.0,
            "teleport_sigma": None,
            "default_guidance": 1.0,
            "max_guidance": 1.0,
        }
    else:
        vp = p.schedule.vp()
        sampling = {
            "samplers": ["lcm"],
            "default_sampler": "lcm",
            "default_steps": 4,
            "max_steps": 8,
            "sigma_min": round(float(vp.sigmas[0]), 6),
            "sigma_max": round(float(vp.sigmas[-1]), 4),
            "rho": 7.0,
            "teleport_sigma": None,
            "default_guidance": 2.0,
            "max_guidance": 4.0,
        }
    data = {
        "kind": p.kind,
        "description": DESCRIPTIONS[p.kind],
        "shape": list(p.shape),
        "data_range": [-1, 1],
        "labels": list(FASHION_LABELS),
        "synonyms": synonyms,
        "sampling": sampling,
        "max_batch_size": 256,
        "max_n": 16,
        "network": config_to_dict(p.network),
        "sigma_data": p.sigma_data,
        "runtimes": list(FASTEST_FIRST),
        "precision": "fp32",
    }
    if p.autoencoder is not None:
        data["autoencoder"] = config_to_dict(p.autoencoder)
    if p.schedule is not None:
        data["schedule"] = dataclasses.asdict(p.schedule)
    return data


def write(p: Package, log: common.Log = print) -> Path:
    """Write the package into run.out/<version>/, reload it through the Repository, card it."""
    out = Path(p.run.out)
    folder = out / str(p.run.version)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {
        name: common.save_weights(m, folder / name, p.run.store_dtype)
        for name, m in p.weights.items()
    }
    if p.stats is not None:
        truncate(p.stats, p.stats.eigvals.shape[1], torch.float32).save(
            folder / "teleport.safetensors"
        )
        sizes["teleport.safetensors"] = (folder / "teleport.safetensors").stat().st_size
    fingerprint = publish(out, p.run.version, p.kind, model_yaml(p), sizes, log)
    (folder / "MODEL_CARD.md").write_text(card(p, fingerprint, sizes))
    return folder


def publish(out: Path, version: int, kind: str, data: dict, sizes: dict, log: common.Log) -> str:
    """Write model.yaml, reload the version through the Repository (so a package that does
    not load fails here), log its files; returns its fingerprint for the card."""
    header = f"# {kind} model written by `fewstep train` (see {version}/MODEL_CARD.md)\n"
    (out / "model.yaml").write_text(header + yaml.safe_dump(data, sort_keys=False))
    # load to check the package and take its fingerprint: no engine export for that
    model = Repository.of_folder(out).load(out.name, version, runtimes=("torch",))
    files = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items())
    log(f"wrote {out / str(version)} ({files})")
    return model.fingerprint


def card(p: Package, fingerprint: str, sizes: dict[str, int]) -> str:
    files = "\n".join(f"- `{name}` ({size / 1e6:.2f} MB)" for name, size in sizes.items())
    params = sum(common.count_params(m) for m in p.weights.values())
    today = datetime.date.today().isoformat()
    epochs = p.run.steps * p.run.batch / max(p.examples, 1)
    return f"""# {Path(p.run.out).name} v{p.run.version}

{DESCRIPTIONS[p.kind]}
{p.notes}
## Recipe

    {common.command_line(p.run)}

## Data

Fashion-MNIST (Xiao et al. 2017, MIT licence) from Debian's `dataset-fashion-mnist`:
{p.examples} training images{" (the first --limit images)" if p.run.limit else ""}, pixels
in [-1, 1], labels from the data set. {p.run.steps} steps at batch {p.run.batch}
= {epochs:.1f} epochs.

## Settings

{common.settings_table(p.run, *p.settings)}

Network: `{config_to_dict(p.network)}`, {params / 1e6:.2f}M parameters in all.

## Files

{files}

Fingerprint `{fingerprint}`. Weights are the EMA weights, {p.run.store_dtype} safetensors.

## Training

{common.hardware(p.run)}, device `{p.run.device}`; {p.seconds / 60:.1f} min training wall
time (all parts of a resumed run); {today}.

## Quality

Not measured when the package was written; see `fewstep eval` and the table in README
("Reference models"), which list every shipped model with the same harness.
"""
