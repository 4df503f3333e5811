"""The model repository: reads model_repo/, validates model.yaml, loads and warms up models.

Layout (Triton-like): `<root>/<name>/model.yaml` describes the model; numeric folders
`<root>/<name>/<version>/` hold what a version runs (weights, statistics, model card).
Every model.yaml is read and checked when the Repository is opened, so a typo fails at
start-up with the file and the field in the message, not on the first request.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from engines.denoisers import (
    CFGDenoiser,
    ConsistencyDenoiser,
    Denoiser,
    DiscreteTimeEDM,
    EDMDenoiser,
    LCMDenoiser,
)
from engines.gaussian import GaussianStats
from engines.nets import (
    Autoencoder,
    AutoencoderConfig,
    ConfigError,
    UNet,
    UNetConfig,
    config_from_dict,
)
from engines.runtimes.base import PRECISIONS, RuntimeNet, batch_buckets
from engines.runtimes.export import EngineCache, Progress, network_io
from engines.runtimes.select import (
    DEFAULT_PREFERENCE,
    RUNTIMES,
    EngineContext,
    Selection,
    select,
)
from engines.samplers import INFO, SAMPLERS
from engines.schedules import DiscreteVP, consistency_grid, karras_sigmas, lcm_sigmas
from engines.speech.spec import SpeechSpec, parse_speech

MODEL_FILE = "model.yaml"
log = logging.getLogger("fewstep.engines")
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
_MISSING = object()


class RepositoryError(ValueError):
    """A model folder, its model.yaml or its files are not what the repository needs."""


class ModelNotFoundError(LookupError):
    """A model or version was asked for that the repository does not hold."""


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

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The [C, H, W] of the images a request gets back: `shape` itself, or for latent
        models (an `autoencoder`) what the decoder makes of a latent of that shape."""
        if self.autoencoder is None:
            return self.shape
        return self.autoencoder.decoded_shape(self.shape)

    def grid(self, steps: int) -> Tensor:
        """The sigma grid for `steps` steps: consistency picks for 'cm', LCM timesteps for
        'lcm', else the Karras grid of `sampling`."""
        s = self.sampling
        if self.kind == "cm":
            return consistency_grid(steps, s.sigma_min, s.sigma_max, s.rho)
        if self.kind == "lcm":
            return lcm_sigmas(self.schedule.vp(), steps, self.schedule.original_steps)
        if self.kind == "speech":
            return self.speech.grid(steps, s.sigma_min, s.sigma_max, s.rho)
        return karras_sigmas(steps, s.sigma_min, s.sigma_max, s.rho)

    def label_id(self, prompt: str) -> int | None:
        """Class id of a label or synonym (case and surrounding space ignored), else None."""
        key = _normal(prompt)
        names = [_normal(label) for label in self.labels]
        if key in names:
            return names.index(key)
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


# A loader gets the spec, the version folder and `wrap`, which turns the torch network into
# the callable the denoiser runs (the chosen runtime). It returns (denoiser, gaussian, files
# read), optionally followed by the networks it built and a decoder from sampler space to
# data space (latent models).
Wrap = Callable[[torch.nn.Module], Callable]
Loader = Callable[[ModelSpec, Path, Wrap], tuple]
NET_KINDS = ("edm", "cm", "lcm")


@dataclass(frozen=True)
class Kind:
    """What a model kind can do and how its version folder is loaded."""

    families: tuple[str, ...]  # sampler families (engines.samplers.INFO) that fit it
    guidance: bool  # whether it supports classifier-free guidance
    load: Loader


def _normal(text: str) -> str:
    return " ".join(text.split()).lower()


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Fields:
    """One mapping of a model.yaml: unknown keys are rejected, every read value is checked."""

    def __init__(self, path: Path, data: object, prefix: str, keys: Sequence[str]) -> None:
        self.path, self.prefix = path, prefix
        if not isinstance(data, dict):
            what = prefix.rstrip(".") or "the file"
            raise RepositoryError(
                f"{path}: {what} must be a mapping of keys to values, got {data!r}"
            )
        for key in data:
            if key not in keys:
                close = difflib.get_close_matches(str(key), keys, n=1)
                hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
                raise RepositoryError(
                    f"{path}: unknown key {prefix}{key}{hint}; the keys here are {list(keys)}"
                )
        self.data = data

    def error(self, key: str, expected: str, got: object = _MISSING) -> RepositoryError:
        got = self.data.get(key) if got is _MISSING else got
        return RepositoryError(f"{self.path}: {self.prefix}{key} must be {expected}, got {got!r}")

    def get(self, key: str, expected: str, ok: Callable[[object], bool], default=_MISSING):
        if key not in self.data:
            if default is _MISSING:
                raise RepositoryError(
                    f"{self.path}: {self.prefix}{key} is missing; it must be {expected}"
                )
            return default
        if not ok(self.data[key]):
            raise self.error(key, expected)
        return self.data[key]

    def integer(self, key: str, lo: int, hi: int | None = None, hint: str = "") -> int:
        if hi is None:
            return self.get(key, f"an integer >= {lo}", lambda v: _is_int(v) and v >= lo)
        expected = f"an integer in {lo}..{hint or hi}"
        return self.get(key, expected, lambda v: _is_int(v) and lo <= v <= hi)

    def number(self, key: str, expected: str, ok: Callable[[float], bool]) -> float:
        return float(self.get(key, expected, lambda v: _is_number(v) and ok(v)))

    def text(self, key: str) -> str:
        return self.get(key, "a non-empty string", lambda v: isinstance(v, str) and v.strip())

    def strings(self, key: str, expected: str) -> tuple[str, ...]:
        def ok(v: object) -> bool:
            if not isinstance(v, list) or not all(isinstance(s, str) and s.strip() for s in v):
                return False
            return len({_normal(s) for s in v}) == len(v)

        return tuple(self.get(key, expected, ok, default=[]))


def _fits(sampler: str, kind: Kind) -> bool:
    info = INFO[sampler]
    return info.family in kind.families and (kind.guidance or not info.guided)


def _parse_sampling(path: Path, data: object, kind: str) -> SamplingSpec:
    f = _Fields(path, data, "sampling.", list(SamplingSpec.__dataclass_fields__))
    names = f.get(
        "samplers",
        "a non-empty list of distinct sampler names",
        lambda v: isinstance(v, list) and v and len(set(map(str, v))) == len(v),
    )
    usable = [n for n in sorted(INFO) if _fits(n, KINDS[kind])]
    for i, name in enumerate(names):
        if not isinstance(name, str) or name not in SAMPLERS or name == "teleport":
            expected = f"a sampler name, one of {usable} (teleport is a flag)"
            raise f.error(f"samplers[{i}]", expected, name)
        if name not in usable:
            expected = f"a sampler that fits a {kind!r} model, one of {usable}"
            raise f.error(f"samplers[{i}]", expected, name)
    default_sampler = f.get(
        "default_sampler", f"one of sampling.samplers {names}", names.__contains__
    )
    max_steps = f.integer("max_steps", max(INFO[n].min_steps({}) for n in names), 1000)
    need = INFO[default_sampler].min_steps({})
    default_steps = f.integer("default_steps", need, max_steps, f"max_steps ({max_steps})")
    sigma_min = f.number("sigma_min", "a number > 0", lambda v: v > 0)
    sigma_max = f.number(
        "sigma_max", f"a number > sigma_min ({sigma_min})", lambda v: v > sigma_min
    )
    rho = f.number("rho", "a number > 0", lambda v: v > 0)
    teleport_sigma = f.get(
        "teleport_sigma",
        f"null or a number strictly between sigma_min ({sigma_min}) and sigma_max ({sigma_max})",
        lambda v: v is None or (_is_number(v) and sigma_min < v < sigma_max),
    )
    if KINDS[kind].guidance:
        max_guidance = f.number("max_guidance", "a number >= 0", lambda v: v >= 0)
        expected = f"a number in 0..max_guidance ({max_guidance})"
        default_guidance = f.number("default_guidance", expected, lambda v: 0 <= v <= max_guidance)
    else:
        expected = f"1.0: a {kind!r} model has no classifier-free guidance"
        max_guidance = f.number("max_guidance", expected, lambda v: v == 1)
        default_guidance = f.number("default_guidance", expected, lambda v: v == 1)
    return SamplingSpec(
        tuple(names),
        default_sampler,
        default_steps,
        max_steps,
        sigma_min,
        sigma_max,
        rho,
        None if teleport_sigma is None else float(teleport_sigma),
        default_guidance,
        max_guidance,
    )


def _parse_synonyms(f: _Fields, labels: tuple[str, ...]) -> dict[str, str]:
    raw = f.get("synonyms", "a mapping of synonym -> label", lambda v: isinstance(v, dict), {})
    if raw and not labels:
        raise f.error("synonyms", "empty: the model has no labels")
    canonical = {_normal(label): label for label in labels}
    for key, label in raw.items():
        field_name = f"synonyms[{key!r}]"
        if not isinstance(key, str) or not key.strip() or _normal(key) != key:
            raise f.error(field_name, "keyed by a lower-case synonym without extra spaces", key)
        if label not in labels or canonical.get(key, label) != label:
            expected = f"one of labels {list(labels)}"
            if key in canonical:
                expected = f"{canonical[key]!r}, the label it spells"
            raise f.error(field_name, expected, label)
    return dict(raw)


def parse_model_yaml(path: Path, name: str, versions: Sequence[int]) -> ModelSpec:
    """Read and check one model.yaml; RepositoryError names the file and the field.

    The spec returned is that of the default version (`default_version`, else the highest).
    """
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise RepositoryError(f"{path}: not a readable YAML file ({err})") from None
    keys = [*list(ModelSpec.__dataclass_fields__)[2:], "default_version"]
    f = _Fields(path, data, "", keys)
    version = f.get(
        "default_version",
        f"one of the version folders {sorted(versions)}",
        lambda v: _is_int(v) and v in versions,
        max(versions),
    )
    kind = f.get("kind", f"one of {sorted(KINDS)}", lambda v: isinstance(v, str) and v in KINDS)
    shape = f.get(
        "shape",
        "a non-empty list of positive integers, e.g. [1, 28, 28]",
        lambda v: isinstance(v, list) and v and all(_is_int(d) and d > 0 for d in v),
    )
    labels = f.strings("labels", "a list of distinct non-empty class names ([] if unconditional)")
    lo_hi = f.get(
        "data_range",
        "[low, high]: two numbers with low < high, e.g. [-1, 1]",
        lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_number, v)) and v[0] < v[1],
    )
    max_batch_size = f.integer("max_batch_size", 1)
    nets = _parse_networks(f, kind, labels)
    engines = _parse_runtimes(f, kind)
    return ModelSpec(
        name=name,
        version=version,
        kind=kind,
        description=f.text("description"),
        shape=tuple(shape),
        labels=labels,
        synonyms=_parse_synonyms(f, labels),
        data_range=(float(lo_hi[0]), float(lo_hi[1])),
        sampling=_parse_sampling(path, f.get("sampling", "a mapping", lambda v: True), kind),
        max_batch_size=max_batch_size,
        max_n=f.integer("max_n", 1),
        **nets,
        **engines,
        **_parse_speech_section(f, kind),
    )


def _parse_speech_section(f: _Fields, kind: str) -> dict[str, object]:
    """speech (kind speech only): its network, grid levels, voices and text limits."""
    if kind != "speech":
        if "speech" in f.data:
            raise f.error("speech", f"absent: a {kind!r} model has no speech section")
        return {}
    raw = f.get("speech", "a mapping of SpeechSpec fields", lambda v: True)
    try:
        return {"speech": parse_speech(raw)}
    except ValueError as err:
        raise RepositoryError(f"{f.path}: speech: {err}") from None


def _parse_runtimes(f: _Fields, kind: str) -> dict[str, object]:
    """runtimes (an ordered preference of distinct runtime names) and precision."""
    if kind not in NET_KINDS:
        for key in ("runtimes", "precision"):
            if key in f.data:
                raise f.error(key, f"absent: a {kind!r} model has no network to compile")
        return {}
    names = list(RUNTIMES)
    raw = f.get(
        "runtimes",
        f"a non-empty list of distinct runtime names, fastest first, from {names}",
        lambda v: isinstance(v, list) and v and len(set(map(str, v))) == len(v),
        list(DEFAULT_PREFERENCE),
    )
    for i, name in enumerate(raw):
        if name not in RUNTIMES:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise f.error(f"runtimes[{i}]", f"one of {names}{hint}", name)
    precision = f.get("precision", f"one of {list(PRECISIONS)}", lambda v: v in PRECISIONS, "fp32")
    return {"runtimes": tuple(raw), "precision": precision}


def _parse_networks(f: _Fields, kind: str, labels: tuple[str, ...]) -> dict[str, object]:
    """network / sigma_data (kinds edm, cm, lcm) and autoencoder / schedule (kind lcm)."""
    wanted = {
        "network": kind in NET_KINDS,
        "sigma_data": kind in NET_KINDS,
        "autoencoder": kind in ("edm", "lcm"),
        "schedule": kind == "lcm",
    }
    for key, needed in wanted.items():
        if not needed and key in f.data:
            raise f.error(key, f"absent: a {kind!r} model has no {key}")
    if kind not in NET_KINDS:
        return {}
    out: dict[str, object] = {"sigma_data": f.number("sigma_data", "a number > 0", lambda v: v > 0)}
    for key, cls in (
        ("network", UNetConfig),
        ("autoencoder", AutoencoderConfig),
        ("schedule", LatentConsistency),
    ):
        if wanted[key] and (key in f.data or kind == "lcm" or key == "network"):
            raw = f.get(key, f"a mapping of {cls.__name__} fields", lambda v: True)
            try:
                out[key] = config_from_dict(cls, raw)
            except ConfigError as err:
                raise RepositoryError(f"{f.path}: {key}: {err}") from None
    network = out["network"]
    if network.classes != len(labels):
        raise f.error("network", f"a network with classes: {len(labels)} (one per label)")
    return out


def _load_gaussian(
    spec: ModelSpec, folder: Path, wrap: Wrap | None = None, name: str = "stats.safetensors"
) -> tuple[Denoiser, GaussianStats | None, list[Path]]:
    path = folder / name
    rebuild = "rebuild it with `fewstep build gaussian`"
    if spec.kind != "gaussian":
        rebuild = "rerun the recipe in the model card, or set sampling.teleport_sigma to null"
    if not path.is_file():
        raise RepositoryError(
            f"{path} not found; a {spec.kind!r} version folder needs it: {rebuild}"
        )
    try:
        stats = GaussianStats.load(path)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise RepositoryError(
            f"{path}: unreadable Gaussian statistics ({err}); {rebuild}"
        ) from None
    classes = len(spec.labels) or 1
    if stats.shape != spec.shape:
        raise RepositoryError(
            f"{path}: statistics of samples shaped {list(stats.shape)}, "
            f"but model.yaml says shape {list(spec.shape)}; {rebuild} or fix model.yaml"
        )
    if stats.labels != spec.labels or stats.classes != classes:
        raise RepositoryError(
            f"{path}: statistics for {stats.classes} classes {list(stats.labels)}, "
            f"but model.yaml says labels {list(spec.labels)}; {rebuild} or fix model.yaml"
        )
    tensors = (stats.mean, stats.eigvals, stats.eigvecs)
    if not all(torch.isfinite(t).all() for t in tensors) or (stats.eigvals < 0).any():
        raise RepositoryError(f"{path}: non-finite values or negative variances; {rebuild}")
    return stats.denoiser(), stats, [path]


def _read_tensors(path: Path, what: str) -> dict[str, Tensor]:
    rebuild = "retrain it with `fewstep train` (see the model card's recipe)"
    if not path.is_file():
        raise RepositoryError(f"{path} not found; this version folder needs {what}: {rebuild}")
    try:
        return load_file(str(path))
    except (OSError, ValueError, SafetensorError) as err:
        raise RepositoryError(f"{path}: unreadable {what} ({err}); {rebuild}") from None


def _build(module: torch.nn.Module, path: Path, what: str) -> torch.nn.Module:
    """Load weights into a freshly built module; a mismatch names the file and the config."""
    try:
        module.load_state_dict(_read_tensors(path, what))
    except RuntimeError as err:
        first = str(err).splitlines()[1:2] or [str(err)]
        raise RepositoryError(
            f"{path}: the weights do not fit the config in model.yaml ({first[0].strip()})"
        ) from None
    return module.eval().requires_grad_(False)


def _load_unet(spec: ModelSpec, folder: Path) -> tuple[UNet, GaussianStats | None, list[Path]]:
    path = folder / "weights.safetensors"
    net = _build(UNet(spec.network), path, "the network weights")
    files, gaussian = [path], None
    if spec.sampling.teleport_sigma is not None:
        _, gaussian, stats_files = _load_gaussian(spec, folder, name="teleport.safetensors")
        files += stats_files
    return net, gaussian, files


def _load_autoencoder(spec: ModelSpec, folder: Path) -> tuple[Autoencoder, Path]:
    path = folder / "autoencoder.safetensors"
    return _build(Autoencoder(spec.autoencoder), path, "the autoencoder weights"), path


def _load_edm(spec: ModelSpec, folder: Path, wrap: Wrap):
    net, gaussian, files = _load_unet(spec, folder)
    denoiser = CFGDenoiser(EDMDenoiser(wrap(net), spec.sigma_data), null_label=len(spec.labels))
    if spec.autoencoder is None:
        return denoiser, gaussian, files, (net,)
    autoencoder, path = _load_autoencoder(spec, folder)  # a latent teacher
    return denoiser, gaussian, [*files, path], (net, autoencoder), autoencoder.decode


def _load_cm(spec: ModelSpec, folder: Path, wrap: Wrap):
    net, gaussian, files = _load_unet(spec, folder)
    return (
        ConsistencyDenoiser(wrap(net), spec.sigma_data, spec.sampling.sigma_min),
        gaussian,
        files,
        (net,),
    )


class _DefaultGuidance:
    """Fills cond['guidance_scale'] with `scale` for rows that do not carry one."""

    def __init__(self, inner: Denoiser, scale: float) -> None:
        self.inner, self.scale = inner, scale

    def __call__(self, x: Tensor, sigma: Tensor, cond=None) -> Tensor:
        cond = dict(cond or {})
        cond.setdefault("guidance_scale", torch.full_like(sigma, self.scale))
        return self.inner(x, sigma, cond)


def _load_lcm(spec: ModelSpec, folder: Path, wrap: Wrap):
    net, gaussian, files = _load_unet(spec, folder)
    autoencoder, path = _load_autoencoder(spec, folder)
    sched = spec.schedule
    lcm = LCMDenoiser(
        DiscreteTimeEDM(EDMDenoiser(wrap(net), spec.sigma_data), sched.vp()),
        sched.vp(),
        prediction="x0",
        timestep_scaling=sched.timestep_scaling,
        sigma_data=sched.boundary_sigma_data,
        embedding_dim=spec.network.guidance_dim,
    )
    # requests without a guidance scale get w = 0 (scale 1), as for CFG models
    denoiser = _DefaultGuidance(lcm, 1.0)
    return denoiser, gaussian, [*files, path], (net, autoencoder), autoencoder.decode


def _load_speech(spec: ModelSpec, folder: Path, wrap=None):
    """Kind speech: encoder, denoiser and mel statistics in one torch module (runtimes other
    than torch are not offered for it yet, so `wrap` is not used)."""
    from engines.nets.tts import TTS
    from engines.speech.model import Speech

    path = folder / "weights.safetensors"
    tts = _build(TTS(spec.speech.network), path, "the network weights")
    speech = Speech(spec, tts)
    return speech.denoiser, None, [path], (tts,), None, speech


KINDS: dict[str, Kind] = {
    "gaussian": Kind(("ode", "sde"), guidance=False, load=_load_gaussian),
    "edm": Kind(("ode", "sde"), guidance=True, load=_load_edm),
    "cm": Kind(("consistency",), guidance=False, load=_load_cm),
    "lcm": Kind(("consistency",), guidance=True, load=_load_lcm),
    "speech": Kind(("ode", "sde", "consistency"), guidance=False, load=_load_speech),
}


def fingerprint(files: Sequence[Path]) -> str:
    """sha256 over the names and bytes of a version's files: 'sha256:<first 16 hex>'."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
    return f"sha256:{digest.hexdigest()[:16]}"


@dataclass(frozen=True)
class _Entry:
    folder: Path
    versions: dict[int, ModelSpec]
    default: int


class Repository:
    """All models under one root folder, each model.yaml checked when the repository opens."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise RepositoryError(f"{self.root}: model repository folder not found")
        self._models: dict[str, _Entry] = {}
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and not folder.name.startswith((".", "_")):
                self._models[folder.name] = self._read(folder)

    @classmethod
    def of_folder(cls, folder: str | Path) -> Repository:
        """A repository of one model folder alone (its parent may hold anything else)."""
        repo = cls.__new__(cls)
        folder = Path(folder)
        repo.root, repo._models = folder.parent, {folder.name: repo._read(folder)}
        return repo

    def _read(self, folder: Path) -> _Entry:
        if not NAME_PATTERN.fullmatch(folder.name):
            raise RepositoryError(
                f"{folder}: model names use lower-case letters, digits, '.', '_' and '-'"
            )
        path = folder / MODEL_FILE
        if not path.is_file():
            raise RepositoryError(f"{folder}: a model folder needs a {MODEL_FILE}")
        versions = []
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            if not re.fullmatch(r"[1-9][0-9]*", sub.name):
                raise RepositoryError(f"{sub}: version folders are named 1, 2, 3, ...")
            versions.append(int(sub.name))
        if not versions:
            raise RepositoryError(f"{folder}: no version folder (1/, 2/, ...) to serve")
        default = parse_model_yaml(path, folder.name, versions)
        specs = {v: replace(default, version=v) for v in sorted(versions)}
        return _Entry(folder, specs, default.version)

    def names(self) -> list[str]:
        return list(self._models)

    def specs(self) -> list[ModelSpec]:
        """Every version of every model, by name then version."""
        return [spec for entry in self._models.values() for spec in entry.versions.values()]

    def _entry(self, name: str) -> _Entry:
        if name not in self._models:
            raise ModelNotFoundError(f"no model {name!r}; this repository holds {self.names()}")
        return self._models[name]

    def default_version(self, name: str) -> int:
        """model.yaml's default_version, else the highest version."""
        return self._entry(name).default

    def spec(self, name: str, version: int | None = None) -> ModelSpec:
        entry = self._entry(name)
        version = entry.default if version is None else version
        if version not in entry.versions:
            raise ModelNotFoundError(
                f"model {name!r} has no version {version!r}; it has {sorted(entry.versions)}"
            )
        return entry.versions[version]

    def load(
        self,
        name: str,
        version: int | None = None,
        *,
        device: str = "cpu",
        cache: EngineCache | None = None,
        threads: int | None = None,
        progress: Progress | None = None,
        runtimes: Sequence[str] | None = None,
    ) -> LoadedModel:
        """Read a version's files, check them against model.yaml, return the runnable model.

        A network runs on the first runtime of spec.runtimes (or of `runtimes`, which
        overrides it) that loads on `device`, artifacts built into `cache` as needed; the
        rest of the model moves there too.
        """
        spec = self.spec(name, version)
        folder = self._entry(name).folder / str(spec.version)
        chosen: list[Selection] = []
        options = {"device": device, "cache": cache, "threads": threads, "progress": progress}

        def wrap(net: torch.nn.Module) -> RuntimeNet:
            ctx = _engine_context(spec, folder, net, precision=spec.precision, **options)
            chosen.append(select(runtimes or spec.runtimes, ctx))
            return RuntimeNet(chosen[-1].runtime, null_label=spec.network.classes)

        denoiser, gaussian, files, *rest = KINDS[spec.kind].load(spec, folder, wrap)
        modules = rest[0] if rest else ()
        decoder = rest[1] if len(rest) > 1 else None
        speech = rest[2] if len(rest) > 2 else None
        engine = chosen[0] if chosen else None
        model = LoadedModel(
            spec,
            denoiser,
            gaussian,
            fingerprint(files),
            engine.runtime.name if engine else "torch",
            decoder,
            modules,
            engine,
            speech,
        )
        return model.to(device) if device != "cpu" else model

    def engine_context(self, name: str, version: int | None = None, **options) -> EngineContext:
        """A version's network (fp32, on the CPU) with what building its engines needs;
        `options` are EngineContext fields (device, precision, cache, threads, force, ...)."""
        spec = self.spec(name, version)
        if spec.network is None:
            raise RepositoryError(f"model {name!r} (kind {spec.kind!r}) has no network to compile")
        folder = self._entry(name).folder / str(spec.version)
        net = _build(UNet(spec.network), folder / "weights.safetensors", "the network weights")
        return _engine_context(spec, folder, net, **options)


def _engine_context(
    spec: ModelSpec, folder: Path, net: torch.nn.Module, **options
) -> EngineContext:
    options = {k: v for k, v in options.items() if v is not None}
    return EngineContext(
        model=f"{spec.name}@{spec.version}",
        fingerprint=fingerprint([folder / "weights.safetensors"]),
        net=net,
        io=network_io(spec),
        buckets=batch_buckets(spec.max_batch_size),
        label_high=len(spec.labels) + 1,
        **{"cache": EngineCache(), **options},
    )
