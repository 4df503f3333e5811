"""`fewstep tune`: search a model's sigma grid per sampler and NFE budget, check it on
held-out noise, and record it in model.yaml (`grids:`) and the model card.

Objective (fixed noise seeds, i.e. common random numbers, so two grids are compared on
the same samples): "fd" (the default), the Frechet distance of the samples to the
Fashion-MNIST test split in the shipped classifier's features; or, for deterministic (ODE)
samplers, the cheaper proxy "ref", the mean squared distance in the same features between
each sample and a many-step reference solution from the same noise (normalised by the
reference features' variance). Measured on fashion-edm, "ref" favours grids whose last
step is long (smooth, mean-like samples: low distance, worse FD), so it is a pre-search at
most. The search runs on seeds SEARCH_SEED_OFFSET + seed; the before/after check (Karras
vs tuned: FD and class accuracy, engines.quality's harness) on seeds from `seed`, so the
numbers that decide whether a grid is written were not searched on. A grid is written
only if its FD is below the plain grid's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from engines.grid_search import GridSpace, SearchResult, pattern_search
from engines.grids_file import write_card, write_grids
from engines.quality import (
    CLASSIFIER,
    Gaussian,
    Reference,
    embed,
    evaluate,
    frechet_distance,
    generate,
    load_classifier,
)
from engines.repository import LoadedModel, Repository, TunedGrid
from engines.samplers import INFO
from engines.schedules import karras_sigmas

SEARCH_SEED_OFFSET = 1_000_000
REFERENCE_SAMPLER = "dpmpp_2m"


@dataclass
class Outcome:
    """One tuned (sampler, steps): the search and the before/after evaluation."""

    sampler: str
    steps: int
    search: SearchResult
    grid: TunedGrid
    fd_current: float = float("inf")  # FD of the grid model.yaml already has, if any

    @property
    def improved(self) -> bool:
        return self.grid.fd_after < min(self.grid.fd_before, self.fd_current)


class Evaluations:
    """engines.quality.evaluate with a JSON-lines cache keyed by everything that decides the
    result (model fingerprint, sampler, the grid itself, n, seed)."""

    def __init__(self, ref: Reference, path: str | None) -> None:
        self.ref, self.path, self.memo = ref, path, {}
        if path and Path(path).is_file():
            for line in Path(path).read_text().splitlines():
                row = json.loads(line)
                self.memo[row["key"]] = row

    def __call__(
        self, model: LoadedModel, sampler: str, sigmas: Tensor, n: int, seed: int, orders=None
    ):
        grid = [round(float(v), 6) for v in sigmas]
        key_parts = [model.fingerprint, sampler, grid, n, seed]
        if orders is not None:  # keys without a schedule stay those of older caches
            key_parts.append(list(orders))
        key = json.dumps(key_parts)
        if key not in self.memo:
            cell = evaluate(
                self.ref, model, sampler, len(grid) - 1, n, seed=seed, grid=sigmas, orders=orders
            )
            row = {"key": key, "fd": cell.fd, "accuracy": cell.accuracy, "nfe": cell.nfe}
            self.memo[key] = row
            if self.path:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
        return self.memo[key]


def _features(ref, model: LoadedModel, sampler: str, steps: int, n, seed, grid, orders=None):
    images, _, _, _ = generate(model, sampler, steps, n, seed=seed, grid=grid, orders=orders)
    return embed(ref.classifier, images)[0]


def make_objective(ref: Reference, model: LoadedModel, sampler: str, steps: int, args):
    """(name, objective(sigmas, orders) -> float) for this sampler, on the search seeds."""
    seed = args.seed + SEARCH_SEED_OFFSET
    if args.objective == "fd":

        def fd(sigmas: Tensor, orders=None) -> float:
            feats = _features(ref, model, sampler, steps, args.n_search, seed, sigmas, orders)
            return frechet_distance(Gaussian.of(feats), ref.test)

        return "fd", fd
    if INFO[sampler].stochastic:
        raise ValueError(f"objective 'ref' needs a deterministic sampler; {sampler} is not")
    target = _reference(ref, model, args.ref_steps, args.n_search, seed)
    scale = float((target - target.mean(0)).square().sum(1).mean())

    def ref_mse(sigmas: Tensor, orders=None) -> float:
        feats = _features(ref, model, sampler, steps, args.n_search, seed, sigmas, orders)
        return float((feats - target).square().sum(1).mean()) / scale

    return "ref-mse", ref_mse


_REFERENCES: dict[tuple, Tensor] = {}


def _reference(ref: Reference, model: LoadedModel, steps: int, n: int, seed: int) -> Tensor:
    """Features of the many-step solutions from the search noise (once per model)."""
    key = (model.fingerprint, steps, n, seed)
    if key not in _REFERENCES:
        print(f"  reference: {REFERENCE_SAMPLER} {steps} steps (Karras), n={n}", flush=True)
        _REFERENCES[key] = _features(ref, model, REFERENCE_SAMPLER, steps, n, seed, "karras")
    return _REFERENCES[key]


def starts(model: LoadedModel, sampler: str, steps: int, extra=(), free_end=False) -> list:
    """The plain grid; a Karras ramp of steps + 1 points whose last (sigma_min, where the
    denoiser is nearly the identity) is replaced by 0, so no evaluation is spent there (with
    `free_end`, the ramp itself too, ending at sigma_min); the grid model.yaml already has
    for this sampler and steps, with its order schedule; and the `extra` grids (--start) of
    this many steps. Grids, or (grid, orders) pairs where the schedule is given."""
    s = model.spec.sampling
    plain = model.spec.grid(steps, sampler, "karras")
    ramp = karras_sigmas(steps, s.sigma_min, float(plain[0]), s.rho, final_zero=False)
    out: list = [plain, torch.cat([ramp[:-1], torch.zeros(1, dtype=torch.float64)])]
    if free_end:
        out.append(ramp)
    if steps in model.spec.grids.get(sampler, {}):
        tuned = model.spec.grid(steps, sampler, "tuned")
        orders = model.spec.grid_options(steps, sampler, "tuned").get("orders")
        out.append(tuned if orders is None else (tuned, orders))
    for grid, orders in extra:
        if len(grid) == steps + 1:
            grid = torch.tensor(grid, dtype=torch.float64)
            out.append(grid if orders is None else (grid, orders))
    distinct: list = []
    for start in out:  # a grid given twice is evaluated once
        grid = start[0] if isinstance(start, tuple) else start
        seen = [d[0] if isinstance(d, tuple) else d for d in distinct]
        if not any(torch.allclose(grid, g, rtol=1e-6, atol=0) for g in seen):
            distinct.append(start)
    return distinct


def tune_one(ref, evals, model, sampler: str, steps: int, args, deadline: float) -> Outcome:
    s = model.spec.sampling
    name, objective = make_objective(ref, model, sampler, steps, args)
    space = GridSpace(
        steps,
        float(model.spec.grid(steps, sampler, "karras")[0]),
        args.end_floor if args.free_end else s.sigma_min,
        free_end=args.free_end,
        max_order=INFO[sampler].max_order if args.orders else 0,
    )
    print(f"{model.spec.name} {sampler} steps={steps}: search ({name}, n={args.n_search})")
    result = pattern_search(
        space,
        objective,
        starts(model, sampler, steps, args.starts, args.free_end),
        step=args.step,
        max_evals=args.max_evals,
        deadline=deadline,
        log=lambda line: print(line, flush=True),
    )
    best = torch.tensor(result.best.sigmas, dtype=torch.float64)
    orders = result.best.orders
    plain = model.spec.grid(steps, sampler, "karras")
    print(
        f"  search: {name} {result.start.value:.5f} (best start) -> {result.best.value:.5f} in "
        f"{len(result.trials)} evaluations (orders {orders or 'default'}), stopped: "
        f"{result.stopped}; check at n={args.n_eval}, "
        f"seed {args.seed}",
        flush=True,
    )
    before = evals(model, sampler, plain, args.n_eval, args.seed)
    after = evals(model, sampler, best, args.n_eval, args.seed, orders)
    current = float("inf")
    if steps in model.spec.grids.get(sampler, {}):  # a new grid must beat it too
        now = model.spec.grid(steps, sampler, "tuned")
        now_orders = model.spec.grid_options(steps, sampler, "tuned").get("orders")
        current = round(evals(model, sampler, now, args.n_eval, args.seed, now_orders)["fd"], 4)
    grid = TunedGrid(
        sigmas=tuple(round(v, 6) for v in result.best.sigmas),
        orders=None if orders is None else tuple(orders),
        objective=name,
        n_search=args.n_search,
        n_eval=args.n_eval,
        seed=args.seed,
        fd_before=round(before["fd"], 4),
        fd_after=round(after["fd"], 4),
        accuracy_before=round(before["accuracy"], 4),
        accuracy_after=round(after["accuracy"], 4),
    )
    print(
        f"  FD {grid.fd_before:.3f} -> {grid.fd_after:.3f}, accuracy "
        f"{grid.accuracy_before:.3f} -> {grid.accuracy_after:.3f}",
        flush=True,
    )
    return Outcome(sampler, steps, result, grid, current)


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("tune", help="search a model's sigma grids per sampler and NFE")
    p.add_argument("model", help="model name in the repository")
    p.add_argument("--nfe", default="2,3,4,5", help="NFE budgets, comma-separated")
    p.add_argument("--samplers", default="", help="default: the model's default sampler")
    p.add_argument("--objective", choices=("fd", "ref"), default="fd", help="see the module doc")
    p.add_argument("--n-search", type=int, default=128, help="samples per objective value")
    p.add_argument("--n-eval", type=int, default=10000, help="samples of the before/after check")
    p.add_argument("--ref-steps", type=int, default=32, help="objective 'ref': reference steps")
    p.add_argument("--max-evals", type=int, default=20, help="objective values per budget")
    p.add_argument("--step", type=float, default=1.0, help="first search step (logit units)")
    p.add_argument(
        "--start",
        action="append",
        default=[],
        help="an extra starting grid, comma-separated sigmas ending in 0 (or, with "
        "--free-end, above it), optionally ':' and its orders, e.g. 80,4,0.5,0.01:1,2,2 (for "
        "the budgets "
        "with that many steps); repeatable",
    )
    p.add_argument(
        "--free-end",
        action="store_true",
        help="search the last level too (above --end-floor) instead of ending at 0",
    )
    p.add_argument("--end-floor", type=float, default=1e-3, help="--free-end: lowest level")
    p.add_argument("--orders", action="store_true", help="search the solver order of each step too")
    p.add_argument("--max-minutes", type=float, default=60.0, help="wall-time budget")
    p.add_argument("--seed", type=int, default=0, help="seed of the before/after samples")
    p.add_argument("--write", action="store_true", help="record grids in model.yaml + card")
    p.add_argument("--report", action="store_true", help="only print the tuned/Karras table")
    p.add_argument("--karras-nfe", default="", help="--report: Karras rows at these NFE too")
    p.add_argument("--cache", default=None, help="JSON-lines cache of evaluations")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch, runtime)")
    p.add_argument("--model-repo", default="model_repo")
    p.add_argument("--classifier", default=str(CLASSIFIER))
    p.set_defaults(run=main)


def _budgets(model, args) -> list[tuple[str, int]]:
    """(sampler, steps) to tune; ValueError naming what to change."""
    s = model.spec.sampling
    samplers = [x for x in args.samplers.split(",") if x] or [s.default_sampler]
    nfes = [int(x) for x in args.nfe.split(",") if x]
    out = []
    for sampler in samplers:
        if sampler not in s.samplers:
            raise ValueError(f"sampler {sampler!r} is not one of {model.spec.name}'s {s.samplers}")
        if INFO[sampler].evals_per_step != 1:
            raise ValueError(f"tune takes one-evaluation-per-step samplers; {sampler} is not")
        for nfe in nfes:
            if not max(2, INFO[sampler].min_steps({})) <= nfe <= s.max_steps:
                raise ValueError(
                    f"--nfe {nfe}: {sampler} grids with an interior to tune need 2.."
                    f"{s.max_steps} steps on {model.spec.name}"
                )
            out.append((sampler, nfe))
    return out


def _start(text: str) -> tuple[list[float], list[int] | None]:
    """A --start value: sigmas, and the orders after a ':' if given."""
    sigmas, _, orders = text.partition(":")
    try:
        return [float(v) for v in sigmas.split(",")], (
            [int(v) for v in orders.split(",")] if orders else None
        )
    except ValueError:
        raise ValueError(
            f"--start {text!r}: give comma-separated sigmas, optionally ':' and comma-separated "
            "orders (e.g. 80,4,0.5,0.01:1,2,2)"
        ) from None


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    try:
        repo = Repository(args.model_repo)
        model = repo.load(args.model, threads=args.threads)
        budgets = _budgets(model, args)
        args.starts = [_start(text) for text in args.start]
        if not args.free_end and any(grid[-1] != 0 for grid, _ in args.starts):
            raise ValueError("--start: a grid that ends above 0 needs --free-end")
        print(f"{args.model}: loaded ({model.runtime}); reading the test set", flush=True)
        ref = Reference(load_classifier(args.classifier))
    except (OSError, ValueError, LookupError) as err:
        print(f"fewstep: {err}", file=sys.stderr)
        return 2
    evals = Evaluations(ref, args.cache)
    if args.report:
        extra = [int(x) for x in args.karras_nfe.split(",") if x]
        print(report(model, evals, budgets, extra, args.n_eval, args.seed))
        return 0
    torch.manual_seed(args.seed)
    start = time.monotonic()
    end = start + args.max_minutes * 60
    outcomes = []
    for i, (sampler, steps) in enumerate(budgets):
        share = (end - time.monotonic()) / (len(budgets) - i)  # the time left, split evenly
        outcomes.append(tune_one(ref, evals, model, sampler, steps, args, time.monotonic() + share))
    kept = {(o.sampler, o.steps): o.grid for o in outcomes if o.improved}
    for o in outcomes:
        if not o.improved:
            print(
                f"{o.sampler} steps={o.steps}: FD {o.grid.fd_after} is not below the plain "
                f"grid's ({o.grid.fd_before}) and model.yaml's ({o.fd_current}); not written"
            )
    print(f"tuned {len(outcomes)} budgets in {(time.monotonic() - start) / 60:.1f} min")
    if args.write and kept:
        folder = repo.root / args.model
        write_grids(folder / "model.yaml", args.model, kept)
        write_card(folder / str(model.spec.version) / "MODEL_CARD.md", kept, args)
        print(f"wrote {len(kept)} grids to {folder / 'model.yaml'} and the model card")
    return 0


def report(model, evals, budgets, karras_nfe, n: int, seed: int) -> str:
    """Markdown: per sampler and budget, FD and class accuracy of the Karras and the tuned
    grid (where model.yaml has one), and Karras at `karras_nfe` for reference."""
    spec = model.spec
    lines = ["| sampler | NFE | grid | FD | class acc. |", "|---|---|---|---|---|"]
    for sampler in dict.fromkeys(s for s, _ in budgets):
        steps_list = sorted({st for s, st in budgets if s == sampler} | set(karras_nfe))
        for steps in steps_list:
            for which in ("karras", "tuned"):
                if which == "tuned" and steps not in spec.grids.get(sampler, {}):
                    continue
                orders = spec.grid_options(steps, sampler, which).get("orders")
                row = evals(model, sampler, spec.grid(steps, sampler, which), n, seed, orders)
                lines.append(
                    f"| {sampler} | {row['nfe']} | {which} | {row['fd']:.3f} | "
                    f"{row['accuracy']:.3f} |"
                )
                print(lines[-1], flush=True)
    note = (
        f"\n{spec.name}: n = {n} samples per row, seed {seed}, labels cycling over the "
        "classes; FD against the 10,000 Fashion-MNIST test images in the shipped classifier's "
        "features (engines.quality)."
    )
    return "\n".join(lines) + note
