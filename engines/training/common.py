"""What every recipe shares: data, seeded batches, EMA, checkpoints, progress, packages."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from engines.data import fashion_root, load_fashion_mnist
from engines.hardware import describe_host

Log = Callable[[str], None]


class RecipeError(ValueError):
    """A recipe's inputs do not fit (a wrong package, mismatched weights): `fewstep train`
    prints the message, not a traceback."""


def one_line_errors(recipe: str, run: Callable[[], int], *more: type[Exception]) -> int:
    """run() a recipe; input problems (missing data, a wrong package, a diverging loss, and
    `more`) are reported as one line and exit status 2, not a traceback."""
    from engines.repository import ModelNotFoundError, RepositoryError

    try:
        return run()
    except (
        OSError,
        RepositoryError,
        ModelNotFoundError,
        RecipeError,
        FloatingPointError,
        *more,
    ) as err:
        print(f"fewstep train {recipe}: {err}", file=sys.stderr)
        return 2


@dataclasses.dataclass
class RunConfig:
    """Settings every recipe has: seed, length, device, where to checkpoint and write."""

    out: str
    work: str
    steps: int
    batch: int = 128
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    limit: int = 0  # train on the first `limit` images only (0: all); smoke tests
    checkpoint_every: int = 500
    log_every: int = 50
    resume: bool = False
    version: int = 1
    data: str | None = None
    amp: bool = False  # bfloat16 autocast on CUDA
    max_minutes: float = 0.0  # stop early after this much training wall time (0: no limit)
    store_dtype: str = "float32"  # the dtype the package's weights are written in
    command: str = ""  # the command line that ran this, for the model card


def training_data(cfg: RunConfig) -> tuple[Tensor, Tensor]:
    x, y = load_fashion_mnist("train", fashion_root(cfg.data))
    if cfg.limit:
        x, y = x[: cfg.limit], y[: cfg.limit]
    return x, y


def batch_indices(n: int, batch: int, seed: int, step: int) -> Tensor:
    """Row indices of step `step`: epoch-wise seeded permutations, so resuming repeats them."""
    per_epoch = max(n // batch, 1)
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[offset * batch : offset * batch + batch]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator for one step's noise: a function of (seed, step), so runs repeat."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 1)


def randn(shape, gen: torch.Generator, device: str) -> Tensor:
    return torch.randn(shape, generator=gen).to(device)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def frozen_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval().requires_grad_(False)


def warmup_lr(opt: torch.optim.Optimizer, lr: float, step: int, warmup: int = 200) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / warmup)


def teacher_update(loss, opt, net: nn.Module, ema: nn.Module, decay: float, step: int) -> float:
    """One optimiser step of a teacher (gradients clipped to norm 1), then its EMA copy
    (warmed up over the first steps); returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    ema_update(ema, net, min(decay, (1 + step) / (10 + step)))
    return loss.item()


class Checkpoints:
    """work/checkpoint.pt holds modules, optimiser and step; saved atomically."""

    def __init__(self, work: str | Path) -> None:
        self.path = Path(work) / "checkpoint.pt"

    def save(self, step: int, seconds: float, **state: nn.Module | torch.optim.Optimizer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        modules = {k: v.state_dict() for k, v in state.items()}
        torch.save({"step": step, "seconds": seconds, **modules}, tmp)
        tmp.replace(self.path)

    def load(self, **state: nn.Module | torch.optim.Optimizer) -> tuple[int, float]:
        """Restore into the given objects; return the step to continue from (0: none) and
        the training seconds spent before it."""
        if not self.path.is_file():
            return 0, 0.0
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        for key, obj in state.items():
            obj.load_state_dict(saved[key])
        return int(saved["step"]), float(saved.get("seconds", 0.0))


class Progress:
    """Prints step, mean loss since the last line, steps/s and ETA."""

    def __init__(self, total: int, start: int, every: int, log: Log) -> None:
        self.total, self.every, self.log = total, every, log
        self.t0, self.s0, self.losses = time.perf_counter(), start, []

    def update(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        done = step + 1
        if done % self.every and done != self.total:
            return
        rate = (done - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        mean = sum(self.losses) / len(self.losses)
        self.log(
            f"step {done}/{self.total}  loss {mean:.4f}  {rate:.2f} steps/s  "
            f"ETA {datetime.timedelta(seconds=round(eta))}"
        )
        self.losses.clear()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def train_loop(
    cfg: RunConfig,
    step_fn: Callable[[int], float],
    state: dict[str, nn.Module | torch.optim.Optimizer],
    log: Log = print,
) -> float:
    """Run step_fn(step) -> loss from the checkpoint (if resuming) to cfg.steps.

    Returns the training seconds of the whole run, earlier (resumed) parts included. With
    cfg.max_minutes set, training stops (checkpointed) once this run has spent that long,
    and cfg.steps becomes the step reached, so the model card reports what was trained.
    """
    ckpt = Checkpoints(cfg.work)
    start, before = ckpt.load(**state) if cfg.resume else (0, 0.0)
    if cfg.resume:
        log(f"resuming at step {start} from {ckpt.path}" if start else "no checkpoint: fresh")
    progress = Progress(cfg.steps, start, cfg.log_every, log)
    for step in range(start, cfg.steps):
        loss = step_fn(step)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}; lower --lr")
        progress.update(step, loss)
        over = cfg.max_minutes > 0 and progress.seconds > cfg.max_minutes * 60
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or over:
            ckpt.save(step + 1, before + progress.seconds, **state)
        if over and step + 1 < cfg.steps:
            log(f"--max-minutes {cfg.max_minutes:g} reached: stopping at step {step + 1}")
            cfg.steps = step + 1
            break
    return before + progress.seconds


def autocast(cfg: RunConfig):
    enabled = cfg.amp and cfg.device.startswith("cuda")
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)


def save_weights(module: nn.Module, path: Path, dtype: str = "float32") -> int:
    """The module's floating-point state as `dtype` safetensors (integer buffers unchanged);
    returns the file size in bytes. Loading casts back to the module's float32."""
    cast = getattr(torch, dtype)
    tensors = {
        k: (v.detach().to(cast) if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in module.state_dict().items()
    }
    save_file(tensors, str(path))
    return path.stat().st_size


def command_line(cfg: RunConfig | None = None) -> str:
    """The command that is running, for the model card's recipe line."""
    if cfg is not None and cfg.command:
        return cfg.command
    argv = list(sys.argv)
    if argv and argv[0].endswith(("cli.py", "fewstep", "__main__.py")):
        argv[0] = "fewstep"
    return shlex.join(argv)


def settings_table(*configs: object) -> str:
    rows = []
    for config in configs:
        for key, value in dataclasses.asdict(config).items():
            rows.append(f"| {key} | `{value}` |")
    return "| setting | value |\n|---|---|\n" + "\n".join(rows)


def hardware(cfg: RunConfig) -> str:
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(cfg.device)}, torch {torch.__version__}"
    return describe_host()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def iterate(x: Tensor, batch: int) -> Iterator[Tensor]:
    for i in range(0, len(x), batch):
        yield x[i : i + batch]
