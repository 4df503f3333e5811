"""The `fewstep train` recipe registry (name -> arguments, run) and what every run shares.

image_recipes.py and speech_recipes.py each list their Recipe values; recipes.py registers
both here and builds the parsers. This module imports neither, so no recipe module imports
another.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from engines.training import common


@dataclass(frozen=True)
class Recipe:
    """One `fewstep train NAME`: its help line, its arguments and what runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


RECIPES: dict[str, Recipe] = {}


def register(*recipes: Recipe) -> None:
    """Add recipes to RECIPES; a name may be registered once."""
    for recipe in recipes:
        if recipe.name in RECIPES:
            raise ValueError(f"a training recipe named {recipe.name!r} is registered already")
        RECIPES[recipe.name] = recipe


def add_recipe_parsers(parsers: argparse._SubParsersAction) -> None:
    """One sub-command per registered recipe, in the order they were registered."""
    for recipe in RECIPES.values():
        p = parsers.add_parser(recipe.name, help=recipe.help)
        recipe.add_arguments(p)
        p.set_defaults(run=recipe.run)


def command(args: argparse.Namespace) -> str:
    """The full command line of this run, every setting spelled out (for the model card)."""
    words = ["fewstep", "train", args.recipe]
    for key, value in vars(args).items():
        if key in ("command", "recipe", "run") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        else:
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            words += [flag, text]
    return shlex.join(words)


def run_config(args: argparse.Namespace) -> common.RunConfig:
    """The settings every recipe's run takes, from its parsed arguments."""
    return common.RunConfig(
        command=command(args),
        out=args.out,
        work=args.work or f"runs/{args.recipe}",
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        limit=args.limit,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        resume=args.resume,
        version=args.version,
        data=args.data,
        amp=args.amp,
        max_minutes=args.max_minutes,
        store_dtype=args.store_dtype,
    )
