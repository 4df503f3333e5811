"""`fewstep train classifier`: the Fashion-MNIST CNN that the quality harness measures with.

Adam with cosine decay, light augmentation (random shifts of up to 2 pixels), label
smoothing 0.1; the package is model_repo/_classifiers/<name>/ (outside the served models:
the repository skips folders that start with '_') with classifier.yaml and a card that
records the test accuracy.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import torch
import yaml
from torch import Tensor
from torch.nn import functional as F

from engines.data import FASHION_LABELS, fashion_root, load_fashion_mnist
from engines.nets import Classifier, ClassifierConfig, config_to_dict
from engines.training import common


def shift(x: Tensor, gen: torch.Generator, pad: int = 2) -> Tensor:
    """Random translations of up to `pad` pixels (one offset per batch, cheap on CPU)."""
    dx, dy = (int(v) for v in torch.randint(-pad, pad + 1, (2,), generator=gen))
    return torch.roll(F.pad(x, (pad,) * 4, value=-1.0), (dy, dx), (2, 3))[..., pad:-pad, pad:-pad]


@torch.no_grad()
def accuracy(model: Classifier, x: Tensor, y: Tensor, device: str) -> float:
    model.eval()
    hits = sum(
        int((model(xb.to(device)).argmax(1).cpu() == yb).sum())
        for xb, yb in zip(x.split(1000), y.split(1000), strict=True)
    )
    return hits / len(x)


def run(run_cfg: common.RunConfig, config: ClassifierConfig | None = None, log=print) -> Path:
    config = config or ClassifierConfig()
    x, y = common.training_data(run_cfg)
    x_test, y_test = load_fashion_mnist("test", fashion_root(run_cfg.data))
    torch.manual_seed(run_cfg.seed)
    model = Classifier(config).to(run_cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=run_cfg.lr, weight_decay=5e-4)
    log(f"classifier {common.count_params(model) / 1e6:.2f}M parameters, {len(x)} images")

    def step(i: int) -> float:
        model.train()
        idx = common.batch_indices(len(x), run_cfg.batch, run_cfg.seed, i)
        gen = common.step_generator(run_cfg.seed, i)
        for group in opt.param_groups:
            group["lr"] = run_cfg.lr * 0.5 * (1 + math.cos(math.pi * i / run_cfg.steps))
        xb = shift(x[idx], gen).to(run_cfg.device)
        loss = F.cross_entropy(model(xb), y[idx].to(run_cfg.device), label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    seconds = common.train_loop(run_cfg, step, {"model": model, "opt": opt}, log)
    test_acc = accuracy(model, x_test, y_test, run_cfg.device)
    log(f"test accuracy {test_acc:.4f}")
    out = Path(run_cfg.out)
    folder = out / str(run_cfg.version)
    folder.mkdir(parents=True, exist_ok=True)
    size = common.save_weights(model, folder / "weights.safetensors")
    meta = {"labels": list(FASHION_LABELS), "network": config_to_dict(config)}
    header = (
        "# Fashion-MNIST classifier for `fewstep eval` (written by `fewstep train classifier`)\n"
    )
    (out / "classifier.yaml").write_text(header + yaml.safe_dump(meta, sort_keys=False))
    (folder / "MODEL_CARD.md").write_text(
        f"""# {out.name} v{run_cfg.version}

A small CNN Fashion-MNIST classifier ({common.count_params(model) / 1e6:.2f}M parameters).
`engines.quality` measures generated samples in its penultimate features ({config.features}
dims, after the hidden ReLU) -- Frechet distance as FID does with Inception -- and checks
that conditional samples are classified as the class asked for. Also usable as a verifier.

## Recipe

    {common.command_line(run_cfg)}

## Data

Fashion-MNIST from Debian's `dataset-fashion-mnist`: {len(x)} training images, random
shifts of up to 2 pixels, label smoothing 0.1; measured on the 10,000 test images.

## Settings

{common.settings_table(run_cfg, config)}

## Files

- `weights.safetensors` ({size / 1e6:.2f} MB, float32; BatchNorm running statistics included)

## Quality

Test accuracy {test_acc:.4f} (10,000 test images).

## Training

{common.hardware(run_cfg)}, device `{run_cfg.device}`; {seconds / 60:.1f} min wall time;
{datetime.date.today().isoformat()}.
"""
    )
    log(f"wrote {folder}")
    return folder
