"""`fewstep train RECIPE`: every image and speech recipe, registered and given a parser."""

from __future__ import annotations

import argparse

from engines.training import image_recipes, registry, speech_recipes

registry.register(*image_recipes.RECIPES, *speech_recipes.RECIPES)


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """`fewstep train` and its recipes."""
    train = commands.add_parser("train", help="train a reference model into model_repo/")
    registry.add_recipe_parsers(train.add_subparsers(dest="recipe", required=True))


if __name__ == "__main__":  # without the service's packages: python -m engines.training.recipes
    parser = argparse.ArgumentParser(prog="python -m engines.training.recipes")
    registry.add_recipe_parsers(parser.add_subparsers(dest="recipe", required=True))
    parsed = parser.parse_args()
    raise SystemExit(parsed.run(parsed))
