"""`fewstep bench scaling MODEL`: best-of-k and FK steering against plain sampling.

Each cell samples n images (labels cycling over the classes, seed 0) through the same
start_sampler the worker uses, with the model's verifier picking among k candidates or
steering k particles, and reports the total NFE per image (k x steps), class accuracy,
FD and images/s. Accuracy measured by the verifier's own classifier is circular (the
search optimises exactly that number), so every cell is also measured by an independent
evaluation classifier (a different architecture and seed, `--eval-classifier`), and FD is
reported in both classifiers' features. images/s includes the verifier's own passes.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from engines.hardware import describe_host
from engines.quality import CLASSIFIER, Gaussian, Reference, embed, frechet_distance
from engines.quality import load_classifier as load_harness_classifier
from engines.repository import LoadedModel, Repository
from engines.samplers import drive
from engines.sampling import start_sampler
from engines.scaling import Choice, Search, candidate_seeds
from engines.scaling import check as check_search

EVAL_CLASSIFIER = Path("model_repo/_classifiers/fashion-cnn-eval")
CELL = re.compile(r"(plain|best_of|steering):(?:(\d+)x)?(\d+)(?:/(\d+))?")
DEFAULT_CELLS = "plain:1,plain:2,plain:4,best_of:2x1,best_of:4x1,best_of:2x2,steering:2x2/1"


@dataclasses.dataclass(frozen=True)
class Spec:
    """One cell to measure: method, k candidates or particles, steps, resample_every."""

    method: str
    k: int
    steps: int
    every: int = 0

    @classmethod
    def parse(cls, text: str) -> Spec:
        m = CELL.fullmatch(text.strip())
        if not m:
            raise ValueError(
                f"cell {text!r}: write plain:STEPS, best_of:KxSTEPS or steering:KxSTEPS/EVERY"
            )
        method, k, steps, every = m[1], int(m[2] or 1), int(m[3]), int(m[4] or 0)
        if (method == "plain") != (k == 1) or (method == "steering") != (every > 0):
            raise ValueError(f"cell {text!r}: plain has k = 1, steering (only) has /EVERY")
        return cls(method, k, steps, every)

    def search(self, model: LoadedModel) -> Search:
        v = model.spec.verifier
        return Search(self.k, self.every, v.potential_scale if v else 1.0)

    @property
    def label(self) -> str:
        if self.method == "plain":
            return f"plain, {self.steps} steps"
        tail = f", resample every {self.every}" if self.every else ""
        return f"{self.method} k={self.k}, {self.steps} steps{tail}"


@dataclasses.dataclass(frozen=True)
class Result:
    spec: Spec
    n: int
    nfe: int  # per image: k x evaluations per row
    acc_verifier: float
    acc_eval: float
    fd_verifier: float | None
    fd_eval: float | None
    images_per_s: float
    mean_score: float | None
    side_by_side: float | None = None  # images/s, cells timed in turns (see `speeds`)


@torch.inference_mode()
def sample(
    model: LoadedModel, sampler: str, spec: Spec, n: int, seed: int = 0, batch: int = 500
) -> tuple[Tensor, Tensor, int, float, list[float]]:
    """n images in [-1, 1] (labels i % classes), labels, NFE per image, seconds, scores."""
    classes = max(len(model.spec.labels), 1)
    labels = torch.arange(n) % classes
    search = spec.search(model)
    problem = check_search(search, sampler, spec.steps, False)
    if problem:
        raise ValueError(problem)
    verifier = model.verifier
    out, scores, used, begin = [], [], 0, time.perf_counter()
    chunk = max(1, batch // spec.k)
    for i in range(0, n, chunk):
        y = labels[i : i + chunk]
        rows_y = y.repeat_interleave(spec.k)
        choice = Choice()

        def verify(x0: Tensor, rows_y: Tensor = rows_y) -> Tensor:
            return verifier.score(model.decode(x0), rows_y)

        extra = {}
        if spec.k > 1:
            extra = {"search": search, "verify": verify, "choice": choice}
        gen, cond, used = start_sampler(
            model, sampler, spec.steps, candidate_seeds(seed + i, len(y), spec.k), rows_y, **extra
        )
        out.append(model.decode(drive(gen, model.denoiser, cond)).float().cpu())
        scores += choice.scores
        print(f"  {spec.label}: {min(i + chunk, n)}/{n}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - begin
    lo, hi = model.spec.data_range
    images = (torch.cat(out).clamp(lo, hi) - lo) / (hi - lo) * 2 - 1
    return images, labels, used * spec.k, seconds, scores


def cached_sample(
    model: LoadedModel, sampler: str, spec: Spec, n: int, seed: int, folder: Path | None
) -> tuple[Tensor, Tensor, int, float, list[float]]:
    """`sample`, kept in `folder` (one file per cell) so measuring can run later, with
    other classifiers, without sampling again; images/s is that of the first run."""
    if folder is None:
        return sample(model, sampler, spec, n, seed)
    name = f"{model.spec.name}-{model.fingerprint[7:]}-{sampler}-{spec.method}"
    path = folder / f"{name}-{spec.k}x{spec.steps}-{spec.every}-n{n}-seed{seed}.pt"
    if path.is_file():
        return tuple(torch.load(path).values())  # type: ignore[return-value]
    got = sample(model, sampler, spec, n, seed)
    folder.mkdir(parents=True, exist_ok=True)
    keys = ("images", "labels", "nfe", "seconds", "scores")
    torch.save(dict(zip(keys, got, strict=True)), path)
    return got


def measure(
    samples: tuple[Tensor, Tensor, int, float, list[float]],
    spec: Spec,
    refs: tuple[Reference, Reference],
    fd: bool,
) -> Result:
    images, labels, nfe, seconds, scores = samples
    n = len(images)
    accs, fds = [], []
    for ref in refs:
        feats, preds = embed(ref.classifier, images)
        accs.append(float((preds == labels).float().mean()))
        fds.append(frechet_distance(Gaussian.of(feats), ref.test) if fd else None)
    mean = sum(scores) / len(scores) if scores else None
    return Result(spec, n, nfe, accs[0], accs[1], fds[0], fds[1], n / seconds, mean)


def speeds(model: LoadedModel, sampler: str, cells: list[Spec], n: int, rounds: int) -> list[float]:
    """images/s of each cell, timed in turns (cell 1, 2, ..., 1, 2, ...) on n images each,
    the median of `rounds`: on a shared machine, only ratios measured side by side mean
    anything."""
    times: list[list[float]] = [[] for _ in cells]
    for r in range(rounds):
        for i, spec in enumerate(cells):
            times[i].append(n / sample(model, sampler, spec, n, seed=10_000 * (r + 1))[3])
    return [sorted(t)[len(t) // 2] for t in times]


def _fd(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"


def table(results: list[Result]) -> str:
    head = (
        "| cell | NFE/image | n | acc. (verifier clf) | acc. (eval clf) | FD (verifier "
        "feats) | FD (eval feats) | images/s (n run) | images/s (side by side) |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    return head + "\n".join(
        f"| {r.spec.label} | {r.nfe} | {r.n} | {r.acc_verifier:.3f} | {r.acc_eval:.3f} | "
        f"{_fd(r.fd_verifier)} | {_fd(r.fd_eval)} | {r.images_per_s:.1f} | "
        f"{'' if r.side_by_side is None else f'{r.side_by_side:.1f}'} |"
        for r in results
    )


def add_parser(targets: argparse._SubParsersAction) -> None:
    p = targets.add_parser("scaling", help="best-of-k and FK steering vs plain sampling")
    p.add_argument("model", help="a model with a verifier: section in its model.yaml")
    p.add_argument("--sampler", default=None, help="default: the model's default sampler")
    p.add_argument("--cells", default=DEFAULT_CELLS, help=f"default {DEFAULT_CELLS}")
    p.add_argument("--n", type=int, default=10000, help="images per cell (default 10000)")
    p.add_argument("--no-fd", action="store_true", help="accuracy only (for small n)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--model-repo", default="model_repo")
    p.add_argument("--classifier", default=str(CLASSIFIER))
    p.add_argument("--eval-classifier", default=str(EVAL_CLASSIFIER))
    p.add_argument("--out", default=None, help="also append the table to this file")
    p.add_argument(
        "--speed-n", type=int, default=0, help="also time every cell in turns on this many"
    )
    p.add_argument("--speed-rounds", type=int, default=3, help="turns for --speed-n (3)")
    p.add_argument(
        "--samples-dir", default=None, help="keep each cell's samples here and reuse them"
    )
    p.add_argument(
        "--sample-only", action="store_true", help="with --samples-dir: sample, measure later"
    )
    p.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    folder = Path(args.samples_dir) if args.samples_dir else None
    try:
        cells = [Spec.parse(c) for c in args.cells.split(",") if c.strip()]
        model = Repository(args.model_repo).load(args.model)
    except (OSError, ValueError) as err:
        print(f"fewstep bench scaling: {err}", file=sys.stderr)
        return 2
    if model.verifier is None:
        print(f"fewstep bench scaling: model {args.model} has no verifier", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    sampler = args.sampler or model.spec.sampling.default_sampler
    begin, made = time.perf_counter(), []
    try:
        for spec in cells:
            made.append(cached_sample(model, sampler, spec, args.n, args.seed, folder))
            print(f"sampled {spec.label}: {args.n / made[-1][3]:.1f} images/s", flush=True)
        if args.sample_only:
            return 0
        refs = tuple(
            Reference(load_harness_classifier(c)) for c in (args.classifier, args.eval_classifier)
        )
    except (OSError, ValueError) as err:
        print(f"fewstep bench scaling: {err}", file=sys.stderr)
        return 2
    results = [
        measure(got, spec, refs, not args.no_fd) for got, spec in zip(made, cells, strict=True)
    ]
    if args.speed_n:
        timed = speeds(model, sampler, cells, args.speed_n, args.speed_rounds)
        results = [
            dataclasses.replace(r, side_by_side=v) for r, v in zip(results, timed, strict=True)
        ]
    text = (
        f"{args.model} ({sampler}), verifier {model.verifier.name}, lambda "
        f"{model.spec.verifier.potential_scale:g}; eval classifier {args.eval_classifier}; "
        f"{describe_host()}, runtime {model.runtime}; "
        f"{(time.perf_counter() - begin) / 60:.1f} min\n\n{table(results)}\n"
    )
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"`{' '.join(sys.argv)}`\n\n{text}\n")
    return 0
