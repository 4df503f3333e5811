"""What a model version is: its spec as model.yaml describes it, and the loaded model.

ModelSpec and its parts (SamplingSpec, LatentConsistency) are plain frozen dataclasses that
model_yaml.py fills; LoadedModel is what kinds.py's loaders and Repository.load return.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engines.denoisers import Denoiser
from engines.gaussian import GaussianStats
from engines.nets import AutoencoderConfig, UNetConfig
from engines.runtimes.select import DEFAULT_PREFERENCE, Selection
from engines.samplers import INFO
from engines.schedules import DiscreteVP, consistency_grid, karras_sigmas, lcm_sigmas
from engines.speech.spec import SpeechSpec
from engines.verifiers import Verifier, VerifierConfig

log = logging.getLogger("fewstep.engines")


def normal_text(text: str) -> str:
    """A label or synonym as compared: inner spaces collapsed, lower case."""
    return " ".join(text.split()).lower()


class RepositoryError(ValueError):
    """A model folder, its model.yaml or its files are not what the repository needs."""


class ModelNotFoundError(LookupError):
    """A model or version was asked for that the repository does not hold."""


class GridError(ValueError):
    """A request asked for a step grid the model does not have (the message names those it has)."""


GRID_CHOICES = ("auto", "tuned", "karras")  # auto: the tuned grid where one exists
GRIDS_KEPT = 4096  # grids a spec remembers (ModelSpec.grid); more clears them


@dataclass(frozen=True)
class TunedGrid:
    """A sigma grid found by `fewstep tune` for one sampler and step count, with how it was
    found and what it measured (FD and class accuracy, Karras grid before, tuned after)."""

    # steps + 1 levels, strictly decreasing, noisiest first; a last level above 0 ends the
    # sample there (as EDM's grids end at sigma_min: the noise left is below a pixel's step)
    sigmas: tuple[float, ...]
    objective: str  # what the search minimised, e.g. "fd" or "ref-mse"
    n_search: int  # samples per objective evaluation (fixed seeds)
    n_eval: int  # samples of the FD / accuracy numbers below
    seed: int  # seed of the evaluation samples
    fd_before: float
    fd_after: float
    accuracy_before: float
    accuracy_after: float
    orders: tuple[int, ...] | None = None  # solver order per step; None: the sampler's own


@dataclass(frozen=True)
class SamplingSpec:
    """How the service may sample a model: samplers, step budget, sigma grid, guidance."""

    samplers: tuple[str, ...]
    default_sampler: str
    default_steps: int
    max_steps: int
    sigma_min: float
    sigma_max: float
    rho: float
    teleport_sigma: float | None  # None: no Gaussian statistics, teleport unsupported
    default_guidance: float  # 1.0 means no classifier-free guidance
    max_guidance: float
    # quality "auto": the step counts admission may pick from, largest first (model.yaml
    # `quality_steps`); empty: the default steps only (auto then never lowers them)
    quality_steps: tuple[int, ...] = ()

    def budgets(self, sampler: str, cap: int | None = None) -> tuple[int, ...]:
        """The step counts quality "auto" may choose for `sampler`, largest first: the
        model's `quality_steps` (else its default steps) the sampler can use, at most `cap`
        (the request's own steps) and never more than max_steps."""
        need = INFO[sampler].min_steps({})
        ladder = self.quality_steps or (self.default_steps,)
        if cap is None:
            return tuple(s for s in ladder if need <= s <= self.max_steps)
        top = min(cap, self.max_steps)  # the client's own steps: the most it wants
        lower = [s for s in ladder if need <= s < top]
        return (top, *lower) if top >= need else ()


@dataclass(frozen=True)
class LatentConsistency:
    """An LCM's discrete schedule (SD's scaled-linear betas) and boundary scalings."""

    timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    original_steps: int = 50
    timestep_scaling: float = 10.0
    boundary_sigma_data: float = 0.5

    def vp(self) -> DiscreteVP:
        return DiscreteVP.scaled_linear(self.timesteps, self.beta_start, self.beta_end)


@dataclass(frozen=True)
class ModelSpec:
    """One version of a model as its model.yaml describes it."""

    name: str
    version: int
    kind: str
    description: str
    shape: tuple[int, ...]
    labels: tuple[str, ...]
    synonyms: dict[str, str] = field(hash=False)
    data_range: tuple[float, float]
    sampling: SamplingSpec
    max_batch_size: int
    max_n: int
    network: UNetConfig | None = None  # kinds edm, cm, lcm: the UNet to rebuild
    sigma_data: float | None = None  # EDM preconditioning's sigma_data
    # kind lcm, and latent edm teachers: shape is the latent's, the decoder maps to data
    autoencoder: AutoencoderConfig | None = None
    schedule: LatentConsistency | None = None  # kind lcm: its discrete VP schedule
    speech: SpeechSpec | None = None  # kind speech: network, grid, voices, text limits
    # network kinds: runtimes to try in order (engines.runtimes.RUNTIMES) and their precision
    runtimes: tuple[str, ...] = DEFAULT_PREFERENCE
    precision: str = "fp32"
    # tuned sigma grids: sampler -> steps -> TunedGrid (model.yaml's `grids:`)
    grids: dict[str, dict[int, TunedGrid]] = field(default_factory=dict, hash=False)
    # image kinds: the verifier of best_of / steering requests (None: they are refused)
    verifier: VerifierConfig | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The [C, H, W] of the images a request gets back: `shape` itself, or for latent
        models (an `autoencoder`) what the decoder makes of a latent of that shape."""
        if self.autoencoder is None:
            return self.shape
        return self.autoencoder.decoded_shape(self.shape)

    def grid(self, steps: int, sampler: str | None = None, grid: str = "auto") -> Tensor:
        """The sigma grid for `steps` steps of `sampler`: its tuned grid (model.yaml's
        `grids:`) when `grid` is "tuned", or "auto" and one exists; else the plain grid:
        consistency picks for 'cm', LCM timesteps for 'lcm', else the Karras grid.

        A new tensor every call (callers may keep it), made from the values the first call
        for these arguments computed: one tensor op per request where the Karras grid
        took up to six."""
        key = (steps, sampler, grid)
        made = self._grids_made.get(key)
        if made is None:
            tensor = self._grid(steps, sampler, grid)  # raises for arguments that cannot work
            if len(self._grids_made) >= GRIDS_KEPT:  # steps and samplers are validated first;
                self._grids_made.clear()  # this only bounds what a direct caller can add
            made = self._grids_made[key] = (tuple(tensor.tolist()), tensor.dtype)
        return torch.tensor(made[0], dtype=made[1])

    @functools.cached_property
    def _grids_made(self) -> dict[tuple, tuple[tuple[float, ...], torch.dtype]]:
        return {}

    def _grid(self, steps: int, sampler: str | None, grid: str) -> Tensor:
        if self.grid_used(sampler, steps, grid) == "tuned":
            return torch.tensor(self.grids[sampler][steps].sigmas, dtype=torch.float64)
        s = self.sampling
        if self.kind == "cm":
            return consistency_grid(steps, s.sigma_min, s.sigma_max, s.rho)
        if self.kind == "lcm":
            return lcm_sigmas(self.schedule.vp(), steps, self.schedule.original_steps)
        if self.kind == "speech":
            return self.speech.grid(steps, s.sigma_min, s.sigma_max, s.rho)
        return karras_sigmas(steps, s.sigma_min, s.sigma_max, s.rho)

    def grid_options(self, steps: int, sampler: str | None = None, grid: str = "auto") -> dict:
        """Sampler options that belong to the grid `grid(steps, sampler, grid)` returns:
        a tuned grid's order schedule ({"orders": [...]}) where it has one, else none."""
        if self.grid_used(sampler, steps, grid) != "tuned":
            return {}
        orders = self.grids[sampler][steps].orders
        return {"orders": list(orders)} if orders is not None else {}

    def grid_used(self, sampler: str | None, steps: int, grid: str = "auto") -> str:
        """Which grid `grid` ("auto", "tuned" or "karras") means for this sampler and step
        count: "tuned" or "karras" (the plain grid). GridError for a name that is not one of
        GRID_CHOICES, or "tuned" where none was tuned (the message names the tuned budgets)."""
        if grid not in GRID_CHOICES:
            raise GridError(f"grid must be one of {list(GRID_CHOICES)}, got {grid!r}")
        tuned = sampler is not None and steps in self.grids.get(sampler, {})
        if grid == "tuned" and not tuned:
            budgets = self.tuned_budgets()
            have = (
                "; its tuned grids are " + ", ".join(f"{k}: steps {v}" for k, v in budgets.items())
                if budgets
                else "; it has none (run `fewstep tune`)"
            )
            raise GridError(
                f"model {self.name} has no tuned grid for sampler {sampler} with {steps} steps"
                f"{have}; send grid 'karras' or 'auto', or those steps"
            )
        return "tuned" if tuned and grid != "karras" else "karras"

    def tuned_budgets(self) -> dict[str, list[int]]:
        """The step counts with a tuned grid, per sampler (for /v1/models and messages)."""
        return {name: sorted(by_steps) for name, by_steps in sorted(self.grids.items())}

    @functools.cached_property
    def _label_ids(self) -> dict[str, int]:
        """Each label's compared form -> its first class id (label_id runs per request)."""
        ids: dict[str, int] = {}
        for i, label in enumerate(self.labels):
            ids.setdefault(normal_text(label), i)
        return ids

    def label_id(self, prompt: str) -> int | None:
        """Class id of a label or synonym (case and surrounding space ignored), else None."""
        key = normal_text(prompt)
        found = self._label_ids.get(key)
        if found is not None:
            return found
        canonical = self.synonyms.get(key)
        return None if canonical is None else self.labels.index(canonical)


@dataclass(frozen=True)
class LoadedModel:
    """A model version ready for the worker: its denoiser and what teleport needs."""

    spec: ModelSpec
    denoiser: Denoiser  # D(x, sigma, cond) -> x0 in EDM coordinates; cond["label"] int64 [B]
    gaussian: GaussianStats | None
    fingerprint: str  # "sha256:<16 hex>" over the files the load read
    runtime: str = "torch"
    decoder: Callable[[Tensor], Tensor] | None = None  # latent models: latents -> data
    modules: tuple[torch.nn.Module, ...] = ()  # networks inside the denoiser and decoder
    engine: Selection | None = None  # network kinds: the runtime chosen and those skipped
    speech: object | None = None  # kind speech: engines.speech.model.Speech (text -> audio)
    verifier: Verifier | None = None  # spec.verifier, loaded (engines.verifiers)

    def describe_runtime(self) -> dict:
        """The runtime that runs the network, its precision and device, and the reasons the
        preferred ones before it were skipped (for /v1/models)."""
        if self.engine is None:
            note = "no network to compile: the closed-form denoiser runs in torch"
            return {"name": self.runtime, "precision": None, "device": None, "note": note}
        return self.engine.describe()

    def decode(self, x: Tensor) -> Tensor:
        """A sample in data space (spec.image_shape): the decoder applied to latents, else x
        itself. The sampler runs on spec.shape (latents for latent models); whoever turns a
        sample or a preview into pixels calls this first.
        """
        return x if self.decoder is None else self.decoder(x)

    def to(self, device: str | torch.device) -> LoadedModel:
        """Move the torch modules to a device (statistics are cast per call); returns self.

        The runtime stays where it was loaded: to run the network on another device, load
        it there (Repository.load(..., device=...)) so a runtime is picked for that device.
        """
        runtime = self.engine.runtime if self.engine else None
        stays = runtime is not None and not runtime.name.startswith("torch")
        if stays and torch.device(runtime.device).type != torch.device(device).type:
            log.warning(
                "%s: moving to %s leaves its network on %s (%s); load it with "
                "device=%r to pick a runtime there",
                self.spec.name,
                device,
                runtime.name,
                runtime.device,
                str(device),
            )
        for module in self.modules:
            module.to(device)
        return self

    def warmup(self, batch_sizes: Sequence[int] = (1, 8)) -> float:
        """Run the denoiser once per batch size on zeros; return the seconds it took."""
        if self.speech is not None:
            return self.speech.warmup()
        start = time.perf_counter()
        for rows in batch_sizes:
            x = torch.zeros(rows, *self.spec.shape)
            sigma = torch.full((rows,), self.spec.sampling.sigma_max)
            cond = {"label": torch.zeros(rows, dtype=torch.int64)} if self.spec.labels else None
            self.denoiser(x, sigma, cond)
        return time.perf_counter() - start
