"""Recording tuned grids: model.yaml's `grids:` section and the model card's table.

model.yaml is edited as text: its `grids:` block (always the last top-level key) is
replaced, every other line stays as it was, and the file is parsed again with the strict
reader before it replaces the old one, so a written grid always loads.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import yaml

from engines.repository import TunedGrid, parse_model_yaml

CARD_START = "<!-- fewstep tune: start -->"
CARD_END = "<!-- fewstep tune: end -->"
COMMENT = "# tuned sigma grids written by `fewstep tune` (see the model card)\n"

Grids = dict[tuple[str, int], TunedGrid]


def _without_grids(text: str) -> str:
    """model.yaml's text with its top-level `grids:` block removed."""
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line == COMMENT:
            continue
        if re.match(r"grids\s*:", line):
            skipping = True
            continue
        if skipping and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        skipping = False
        out.append(line)
    return "".join(out)


def write_grids(path: Path, name: str, grids: Grids) -> None:
    """Merge `grids` into model.yaml's `grids:` (replacing those of the same sampler and
    steps) and check the result with the strict parser before replacing the file."""
    text = path.read_text()
    merged: dict = yaml.safe_load(text).get("grids") or {}
    for (sampler, steps), grid in sorted(grids.items()):
        entry = dataclasses.asdict(grid)
        entry["sigmas"] = list(grid.sigmas)
        if grid.orders is None:  # the sampler's own schedule
            del entry["orders"]
        else:
            entry["orders"] = list(grid.orders)
        merged.setdefault(sampler, {})[steps] = entry
    ordered = {s: dict(sorted(by.items())) for s, by in sorted(merged.items())}
    body = _without_grids(text).rstrip("\n") + "\n"
    block = yaml.safe_dump({"grids": ordered}, sort_keys=False, default_flow_style=None)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(body + COMMENT + block)
    versions = [int(p.name) for p in path.parent.iterdir() if p.is_dir() and p.name.isdigit()]
    try:
        parse_model_yaml(tmp, name, versions)
    except ValueError:
        tmp.unlink()
        raise
    os.replace(tmp, path)


def card_table(grids: Grids) -> str:
    rows = [
        f"| {s} | {st} | {g.n_eval} | {g.fd_before:.3f} | {g.fd_after:.3f} | "
        f"{g.accuracy_before:.3f} | "
        f"{g.accuracy_after:.3f} | {g.objective} (n={g.n_search}) | "
        + ", ".join(f"{v:.4g}" for v in g.sigmas)
        + f" | {', '.join(map(str, g.orders)) if g.orders else 'default'} |"
        for (s, st), g in sorted(grids.items())
    ]
    return "\n".join(
        [
            "| sampler | steps (NFE) | n eval | FD plain | FD tuned | acc. plain | acc. tuned | "
            "search objective | tuned sigmas | orders |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


def write_card(path: Path, grids: Grids, args) -> None:
    """Add (or replace) the card's "Tuned step grids" section with every grid of model.yaml."""
    all_grids = _all_grids(path.parent.parent / "model.yaml", path.parent.parent.name) | grids
    g = next(iter(grids.values()))
    text = path.read_text() if path.is_file() else ""
    old = text.partition(CARD_START)[2].partition(CARD_END)[0]
    commands = re.findall(r"^- `(fewstep tune [^`]*)`$", old, re.MULTILINE)
    commands = [c for c in commands if c != _command(args)] + [_command(args)]
    listed = "\n".join(f"- `{c}`" for c in commands)
    section = f"""{CARD_START}
## Tuned step grids

Found by `fewstep tune` (engines/tune.py): a compass search over the interior log-sigmas
(softmax increments between sigma_max and sigma_min; the final 0 fixed, or with
`--free-end` the last level searched too, the sample ending there) and, with `--orders`,
the solver order of each step ("default": the sampler's own schedule) on fixed noise
seeds; objective "ref-mse" = feature-space distance to a many-step DPM-Solver++(2M)
solution from the same noise, "fd" = FD of the search samples. The before/after numbers are
on other seeds: "n eval" samples (seed {g.seed}), FD against the 10,000 Fashion-MNIST
test images in the shipped classifier's features, class accuracy of the same classifier.
"Plain" is the grid the model had (Karras; for `cm` the consistency picks of a 40-point
Karras grid). The worker uses these grids by default for these samplers and steps (`grid: "karras"`
asks for the plain one). A grid is written only where its FD is below Karras's; a later
run replaces the grid of the same sampler and steps. Commands, in order:

{listed}

{card_table(all_grids)}
{CARD_END}
"""
    if CARD_START in text:
        head, _, rest = text.partition(CARD_START)
        text = head + section.rstrip("\n") + rest.partition(CARD_END)[2]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def _all_grids(path: Path, name: str) -> Grids:
    versions = [int(p.name) for p in path.parent.iterdir() if p.is_dir() and p.name.isdigit()]
    spec = parse_model_yaml(path, name, versions)
    return {(s, st): g for s, by in spec.grids.items() for st, g in by.items()}


def _command(args) -> str:
    parts = [f"fewstep tune {args.model} --nfe {args.nfe}"]
    if args.samplers:
        parts.append(f"--samplers {args.samplers}")
    parts.append(
        f"--objective {args.objective} --n-search {args.n_search} --n-eval {args.n_eval} "
        f"--ref-steps {args.ref_steps} --max-evals {args.max_evals} "
        f"--max-minutes {args.max_minutes:g} --seed {args.seed}"
    )
    if getattr(args, "free_end", False):
        parts.append(f"--free-end --end-floor {args.end_floor:g}")
    if getattr(args, "orders", False):
        parts.append("--orders")
    if getattr(args, "step", 1.0) != 1.0:
        parts.append(f"--step {args.step:g}")
    parts += [f"--start {start}" for start in getattr(args, "start", [])]
    return " ".join([*parts, "--write"])
