"""Sample quality: Frechet distance in a Fashion-MNIST classifier's features, class accuracy.

FD is FID's formula (Heusel et al. 2017) with the shipped classifier's penultimate layer
in place of Inception's pool layer: |mu_g - mu_r|^2 + tr(C_g + C_r - 2 (C_g C_r)^(1/2)),
generated images against the 10,000 real test images. Its floor -- real training images
against the same test images, at the same n -- says how low a perfect model could go.
Class accuracy is the classifier's accuracy on conditional samples (labels cycling over
the classes). `fewstep eval` runs one cell; `fewstep eval --table` every shipped model.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor

from engines.data import fashion_root, load_fashion_mnist
from engines.hardware import describe_host
from engines.nets import Classifier, ClassifierConfig, config_from_dict
from engines.noise import row_seeds
from engines.reports import out_file
from engines.repository import LoadedModel, Repository
from engines.samplers import drive
from engines.sampling import start_sampler

CLASSIFIER = Path("model_repo/_classifiers/fashion-cnn")
TABLE_NFES = (1, 2, 4, 5, 8, 10)


def load_classifier(folder: str | Path = CLASSIFIER, version: int = 1) -> Classifier:
    """The shipped classifier: classifier.yaml (its config) and <version>/weights.safetensors."""
    folder = Path(folder)
    path = folder / "classifier.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; train it with `fewstep train classifier --out {folder}`"
        )
    config = config_from_dict(ClassifierConfig, yaml.safe_load(path.read_text())["network"])
    model = Classifier(config)
    model.load_state_dict(load_file(str(folder / str(version) / "weights.safetensors")))
    return model.eval().requires_grad_(False)


@torch.inference_mode()
def embed(clf: Classifier, x: Tensor, batch: int = 1000) -> tuple[Tensor, Tensor]:
    """Penultimate features (float64) and predicted classes of images in [-1, 1]."""
    device = next(clf.parameters()).device
    feats, preds = [], []
    for i in range(0, len(x), batch):
        f = clf.features(x[i : i + batch].to(device).float().clamp(-1, 1))
        feats.append(f.double().cpu())
        preds.append(clf.logits(f).argmax(1).cpu())
    return torch.cat(feats), torch.cat(preds)


@dataclasses.dataclass(frozen=True)
class Gaussian:
    """Mean and covariance of a feature set."""

    mean: Tensor
    cov: Tensor

    @classmethod
    def of(cls, feats: Tensor) -> Gaussian:
        return cls(feats.mean(0), torch.cov(feats.T.double()))


def _sqrt_psd(m: Tensor) -> Tensor:
    lam, u = torch.linalg.eigh(m)
    return (u * lam.clamp(min=0).sqrt()) @ u.T


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), exact for PSD C."""
    root_a = _sqrt_psd(a.cov.double())
    middle = root_a @ b.cov.double() @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    mean = (a.mean.double() - b.mean.double()).square().sum()
    return float(mean + a.cov.trace() + b.cov.trace() - 2 * cross)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One evaluated (model, sampler, steps, teleport, guidance) setting."""

    model: str
    sampler: str
    steps: int
    nfe: int
    teleport: bool
    guidance: float
    n: int
    fd: float
    accuracy: float
    images_per_s: float


class Reference:
    """The classifier and the real test set's features, computed once."""

    def __init__(self, classifier: Classifier, data: str | None = None) -> None:
        self.classifier = classifier
        root = fashion_root(data)
        self.x_test, self.y_test = load_fashion_mnist("test", root)
        self.x_train, self.y_train = load_fashion_mnist("train", root)
        feats, preds = embed(classifier, self.x_test)
        self.test = Gaussian.of(feats)
        self.test_accuracy = float((preds == self.y_test).float().mean())

    def floor(self, n: int, seed: int = 0) -> float:
        """FD of n real training images (seeded pick) against the real test set."""
        pick = torch.randperm(len(self.x_train), generator=torch.Generator().manual_seed(seed))
        return frechet_distance(
            Gaussian.of(embed(self.classifier, self.x_train[pick[:n]])[0]), self.test
        )


@torch.inference_mode()
def generate(
    model: LoadedModel,
    sampler: str,
    steps: int,
    n: int,
    teleport: bool = False,
    guidance: float = 1.0,
    seed: int = 0,
    batch: int = 500,
    device: str = "cpu",
    grid: str | Tensor = "auto",
    orders: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor, int, float]:
    """n conditional samples (labels i % classes) in data space, labels, NFE, seconds.

    `grid` and `orders` as engines.sampling.start_sampler takes them: "auto", "tuned",
    "karras", or sigmas (with an order schedule, or None for the sampler's own).
    """
    classes = max(len(model.spec.labels), 1)
    labels = torch.arange(n) % classes
    out, start, used = [], time.perf_counter(), 0
    for i in range(0, n, batch):
        y = labels[i : i + batch]
        gen, cond, used = start_sampler(
            model,
            sampler,
            steps,
            row_seeds(seed + i, len(y)),
            y,
            teleport,
            guidance,
            device=device,
            grid=grid,
            orders=orders,
        )
        out.append(model.decode(drive(gen, model.denoiser, cond)).float().cpu())
    seconds = time.perf_counter() - start
    lo, hi = model.spec.data_range
    images = (torch.cat(out).clamp(lo, hi) - lo) / (hi - lo) * 2 - 1
    return images, labels, used, seconds


def evaluate(
    ref: Reference,
    model: LoadedModel,
    sampler: str,
    steps: int,
    n: int,
    teleport: bool = False,
    guidance: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
    grid: str | Tensor = "auto",
    batch: int = 500,
    orders: Sequence[int] | None = None,
) -> Cell:
    images, labels, used, seconds = generate(
        model, sampler, steps, n, teleport, guidance, seed, batch, device, grid, orders
    )
    feats, preds = embed(ref.classifier, images)
    fd = frechet_distance(Gaussian.of(feats), ref.test)
    accuracy = float((preds == labels).float().mean())
    return Cell(
        model.spec.name, sampler, steps, used, teleport, guidance, n, fd, accuracy, n / seconds
    )


def steps_for_nfe(sampler: str, target: int) -> int | None:
    """Steps that spend exactly `target` NFE (Heun: 2 steps - 1), else None."""
    if sampler == "heun":
        return (target + 1) // 2 if target % 2 else None
    return target


def table_cells(repo: Repository) -> list[tuple[str, str, int, bool, float]]:
    """(model, sampler, steps, teleport, guidance) for every shipped model's table rows."""
    cells = []
    for name in repo.names():
        spec = repo.spec(name)
        s = spec.sampling
        if spec.kind == "speech":  # measured by `fewstep eval-speech`
            continue
        if spec.kind in ("gaussian", "edm"):
            for target in TABLE_NFES:
                solver = "dpmpp_2m" if target > 1 else "euler"  # its first step is Euler's
                for tp in (False, True) if s.teleport_sigma is not None else (False,):
                    cells.append((name, solver, target, tp, 1.0))
            if spec.kind == "edm":
                cells.append((name, "heun", steps_for_nfe("heun", 35), False, 1.0))
                cells.append((name, "dpmpp_2m", 10, False, 2.0))
        else:
            for target in (n for n in TABLE_NFES if n <= s.max_steps):
                cells.append((name, s.default_sampler, target, False, s.default_guidance))
            if spec.kind == "lcm":
                cells.append((name, "lcm", 4, False, 1.0))
    return cells


def markdown(cells: list[Cell], floor: float, n: int, ref: Reference, seconds: float) -> str:
    rows = "\n".join(
        f"| {c.model} | {c.sampler} | {c.steps} | {c.nfe} | {'yes' if c.teleport else 'no'} "
        f"| {c.guidance:g} | {c.fd:.2f} | {c.accuracy:.3f} | {c.images_per_s:.0f} |"
        for c in cells
    )
    return f"""| model | sampler | steps | NFE | teleport | guidance | FD | class acc. | images/s |
|---|---|---|---|---|---|---|---|---|
{rows}
| real train images (floor) | | | | | | {floor:.2f} | {ref.test_accuracy:.3f} (test) | |

n = {n} samples per row (labels cycling over the 10 classes, seed 0), FD against the
10,000 test images in the shipped classifier's penultimate features; the floor row is
{n} real training images against the same test images (and the classifier's accuracy on
the test set). images/s: single process, batch 500, {_device_line()}. Table computed
in {seconds / 60:.1f} min.
"""


def _device_line() -> str:
    return describe_host()


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("eval", help="sample quality: FD in classifier features, accuracy")
    p.add_argument("model", nargs="?", help="model name in the repository")
    p.add_argument("--sampler", default=None, help="default: the model's default sampler")
    p.add_argument("--steps", type=int, default=None, help="default: the model's default")
    p.add_argument("--n", type=int, default=10000, help="samples (default 10000)")
    p.add_argument("--teleport", action="store_true", help="teleport jump first")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance scale (1: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--grid",
        choices=("auto", "tuned", "karras"),
        default="auto",
        help="sigma grid: the tuned one where model.yaml has one (auto), or the plain one",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--runtime",
        default=None,
        help="run the network on this runtime (e.g. onnxruntime-int8); default: model.yaml's",
    )
    p.add_argument("--model-repo", default="model_repo")
    p.add_argument("--classifier", default=str(CLASSIFIER))
    p.add_argument("--table", action="store_true", help="every shipped model, markdown table")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument("--models", default="", help="--table: comma-separated subset")
    p.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    try:
        out = out_file(args.out)
        ref = Reference(load_classifier(args.classifier).to(args.device))
        repo = Repository(args.model_repo)
    except (OSError, ValueError) as err:
        print(f"fewstep: {err}", file=sys.stderr)
        return 2
    runtimes = [args.runtime] if args.runtime else None
    # measuring an INT8 artifact is how its quality gate decides, so eval may load one the
    # gate has not passed (engines/quality_gate.py)
    load = functools.cache(
        lambda name: repo.load(name, device=args.device, runtimes=runtimes, ungated_int8=True)
    )
    start = time.perf_counter()
    if args.table:
        chosen = set(filter(None, args.models.split(",")))
        cells = []
        for name, sampler, steps, tp, w in table_cells(repo):
            if chosen and name not in chosen:
                continue
            cell = evaluate(
                ref, load(name), sampler, steps, args.n, tp, w, args.seed, args.device, args.grid
            )
            print(_line(cell), flush=True)
            cells.append(cell)
        text = markdown(cells, ref.floor(args.n), args.n, ref, time.perf_counter() - start)
        print(text)
        if out is not None:
            out.write_text(text)
        return 0
    if not args.model:
        print("fewstep: name a MODEL, or pass --table", file=sys.stderr)
        return 2
    model = load(args.model)
    if args.runtime and model.runtime != args.runtime:
        reasons = model.engine.skipped if model.engine else ()
        print(f"fewstep: {args.model} cannot run on {args.runtime}: {reasons}", file=sys.stderr)
        return 2
    print(f"{args.model}: the network runs on {model.runtime}", flush=True)
    sampler = args.sampler or model.spec.sampling.default_sampler
    steps = args.steps or model.spec.sampling.default_steps
    try:
        grid = "karras" if args.teleport else args.grid
        model.spec.grid_used(sampler, steps, grid)
    except ValueError as err:
        print(f"fewstep: {err}", file=sys.stderr)
        return 2
    cell = evaluate(
        ref,
        model,
        sampler,
        steps,
        args.n,
        args.teleport,
        args.guidance,
        args.seed,
        args.device,
        grid,
    )
    print(_line(cell) + f"  grid {model.spec.grid_used(sampler, steps, grid)}")
    print(f"floor (real train vs test, n={args.n}): FD {ref.floor(args.n):.2f}")
    return 0


def _line(c: Cell) -> str:
    return (
        f"{c.model} {c.sampler} steps={c.steps} nfe={c.nfe} teleport={c.teleport} "
        f"guidance={c.guidance:g} n={c.n}: FD {c.fd:.2f}  class acc {c.accuracy:.3f}  "
        f"{c.images_per_s:.0f} images/s"
    )
