"""`fewstep train edm-teacher | cd | classifier | autoencoder | lcm-teacher | lcm`: the image
recipes' arguments and dispatch (registered by engines.training.recipes)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from engines.nets import ClassifierConfig, UNetConfig
from engines.training import common
from engines.training.registry import Recipe, run_config

# CPU-sized defaults (documented in each model card); a GPU run passes bigger ones.
DEFAULTS = {
    "edm-teacher": {"out": "model_repo/fashion-edm", "steps": 3000, "channels": "16,32,64"},
    "cd": {"out": "model_repo/fashion-cd", "steps": 1000, "lr": 1e-4},
    "classifier": {"out": "model_repo/_classifiers/fashion-cnn", "steps": 2000},
    "autoencoder": {"out": "runs/autoencoder", "steps": 2000},
    "lcm-teacher": {
        "out": "runs/latent_repo/fashion-latent-edm",
        "steps": 3000,
        "channels": "64,128",
    },
    "lcm": {"out": "runs/latent_repo/fashion-lcm", "steps": 1000, "lr": 1e-4},
}
HELP = {
    "edm-teacher": "EDM teacher UNet with CFG label dropout and teleport statistics",
    "cd": "consistency distillation from an EDM teacher package",
    "classifier": "Fashion-MNIST CNN for the quality harness",
    "autoencoder": "28x28 <-> 4x7x7 autoencoder for the latent models",
    "lcm-teacher": "EDM teacher in the autoencoder's latent space",
    "lcm": "latent consistency distillation with guidance embedding",
}


def _channels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 16,32,64, got {text!r}") from None


def _common(p: argparse.ArgumentParser, name: str) -> None:
    d = DEFAULTS[name]
    p.add_argument("--out", default=d["out"], help=f"package folder (default {d['out']})")
    p.add_argument("--version", type=int, default=1, help="version folder (default 1)")
    p.add_argument("--work", default=None, help="checkpoint folder (default runs/<recipe>)")
    p.add_argument("--steps", type=int, default=d["steps"], help=f"default {d['steps']}")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=d.get("lr", 1e-3))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--limit", type=int, default=0, help="first N training images (0: all)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from --work's checkpoint")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop after this much training wall time; the card records the steps reached",
    )
    p.add_argument(
        "--store-dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="dtype of the packaged weights (float16 halves the files; default float32)",
    )
    p.add_argument("--data", default=None, help="Fashion-MNIST folder")
    if "channels" in d:
        p.add_argument("--channels", type=_channels, default=_channels(d["channels"]))
        p.add_argument("--blocks", type=int, default=1, help="res blocks per level (1)")
        p.add_argument("--emb-dim", type=int, default=128)
        p.add_argument("--no-attention", action="store_true")
        p.add_argument("--dropout", type=float, default=0.0)


def _arguments(name: str) -> Callable[[argparse.ArgumentParser], None]:
    def add_arguments(p: argparse.ArgumentParser) -> None:
        _common(p, name)
        if name in ("cd", "lcm"):
            default = (
                "model_repo/fashion-edm" if name == "cd" else "runs/latent_repo/fashion-latent-edm"
            )
            p.add_argument("--teacher", default=default, help=f"teacher package ({default})")
            p.add_argument("--grid", type=int, default=18 if name == "cd" else 50)
            p.add_argument("--ema", type=float, default=0.95)
            p.add_argument(
                "--init", default=None, help="continue from this earlier student package"
            )
        if name in ("lcm-teacher", "lcm"):
            p.add_argument("--autoencoder", default="runs/autoencoder")
        if name == "classifier":
            p.add_argument(
                "--widths", type=_channels, default=(32, 64, 128), help="conv widths per level"
            )
            p.add_argument("--features", type=int, default=128, help="penultimate features")

    return add_arguments


def unet_config(args: argparse.Namespace, **extra) -> UNetConfig:
    return UNetConfig(
        channels=args.channels,
        blocks=args.blocks,
        emb_dim=args.emb_dim,
        attention=not args.no_attention,
        dropout=args.dropout,
        **extra,
    )


def main(args: argparse.Namespace) -> int:
    """Run a recipe; input problems (unreadable data too) are one line and exit status 2."""
    from engines.data import DataFormatError

    return common.one_line_errors(args.recipe, lambda: _run(args), DataFormatError)


def _run(args: argparse.Namespace) -> int:
    run = run_config(args)
    if args.recipe == "edm-teacher":
        from engines.training import edm

        edm.run(run, unet_config(args), edm.EDMSettings())
    elif args.recipe == "classifier":
        from engines.training import classifier

        classifier.run(run, ClassifierConfig(channels=args.widths, features=args.features))
    elif args.recipe == "cd":
        from engines.training import cd

        cd.run(run, args.teacher, cd.CDSettings(grid=args.grid, ema=args.ema, init=args.init))
    elif args.recipe == "autoencoder":
        from engines.training import latent

        latent.run_autoencoder(run)
    elif args.recipe == "lcm-teacher":
        from engines.training import latent

        latent.run_teacher(run, unet_config(args, in_channels=4), args.autoencoder)
    else:
        from engines.training import lcm

        lcm.run(run, args.teacher, lcm.LCMSettings(grid=args.grid, ema=args.ema, init=args.init))
    return 0


RECIPES = tuple(Recipe(name, HELP[name], _arguments(name), main) for name in DEFAULTS)
