"""Strict model.yaml parsing: unknown keys are rejected and every value is checked, so a
typo fails when the repository opens, with the file and the field in the message."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from engines.nets import AutoencoderConfig, ConfigError, UNetConfig, config_from_dict
from engines.repository.kinds import KINDS, NET_KINDS, Kind
from engines.repository.spec import (
    LatentConsistency,
    ModelSpec,
    RepositoryError,
    SamplingSpec,
    TunedGrid,
    normal_text,
)
from engines.repository.vocoders import check_fits, read_vocoder
from engines.runtimes.base import PRECISIONS
from engines.runtimes.select import DEFAULT_PREFERENCE, RUNTIMES
from engines.samplers import INFO, SAMPLERS, SamplerError, check_orders
from engines.speech.spec import GRIFFIN_LIM, parse_speech
from engines.verifiers import VERIFIERS, VerifierConfig

_MISSING = object()
NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


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
            return len({normal_text(s) for s in v}) == len(v)

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
    quality_steps = _quality_steps(f, INFO[default_sampler].min_steps({}), max_steps)
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
        quality_steps,
    )


def _quality_steps(f: _Fields, need: int, max_steps: int) -> tuple[int, ...]:
    """sampling.quality_steps: distinct step counts for quality "auto", each in
    min_steps(default_sampler)..max_steps; kept largest first."""
    expected = f"a non-empty list of distinct integers in {need}..max_steps ({max_steps})"

    def ok(v: object) -> bool:
        return (
            isinstance(v, list)
            and bool(v)
            and all(_is_int(s) and need <= s <= max_steps for s in v)
            and len(set(v)) == len(v)
        )

    return tuple(sorted(f.get("quality_steps", expected, ok, default=[]), reverse=True))


def _parse_synonyms(f: _Fields, labels: tuple[str, ...]) -> dict[str, str]:
    raw = f.get("synonyms", "a mapping of synonym -> label", lambda v: isinstance(v, dict), {})
    if raw and not labels:
        raise f.error("synonyms", "empty: the model has no labels")
    canonical = {normal_text(label): label for label in labels}
    for key, label in raw.items():
        field_name = f"synonyms[{key!r}]"
        if not isinstance(key, str) or not key.strip() or normal_text(key) != key:
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
    sampling = _parse_sampling(path, f.get("sampling", "a mapping", lambda v: True), kind)
    return ModelSpec(
        name=name,
        version=version,
        kind=kind,
        description=f.text("description"),
        shape=tuple(shape),
        labels=labels,
        synonyms=_parse_synonyms(f, labels),
        data_range=(float(lo_hi[0]), float(lo_hi[1])),
        sampling=sampling,
        max_batch_size=max_batch_size,
        max_n=f.integer("max_n", 1),
        grids=_parse_grids(f, sampling),
        **nets,
        **engines,
        **_parse_speech_section(f, kind),
        verifier=_parse_verifier(f, kind, labels),
    )


def _parse_verifier(f: _Fields, kind: str, labels: tuple[str, ...]) -> VerifierConfig | None:
    """verifier (image kinds, optional): the verifier of best_of / steering requests."""
    raw = f.get("verifier", "a mapping of verifier settings or null", lambda v: True, None)
    if raw is None:
        return None
    if KINDS[kind].modality != "image":
        raise f.error("verifier", f"absent: a {kind!r} model has no verifier")
    v = _Fields(f.path, raw, "verifier.", list(VerifierConfig.__dataclass_fields__))
    name = v.get("name", f"one of {sorted(VERIFIERS)}", lambda x: x in VERIFIERS)
    if name == "classifier" and not labels:
        raise v.error("name", "not 'classifier' for a model without labels (it scores a class)")
    defaults = VerifierConfig(name)
    classifier = v.get(
        "classifier",
        "the name of a folder under the repository's _classifiers/, e.g. fashion-cnn",
        lambda x: isinstance(x, str) and NAME.fullmatch(x) is not None,
        defaults.classifier,
    )
    version = v.get("version", "an integer >= 1", lambda x: _is_int(x) and x >= 1, 1)
    max_candidates = v.get(
        "max_candidates",
        "an integer in 1..64",
        lambda x: _is_int(x) and 1 <= x <= 64,
        defaults.max_candidates,
    )
    scale = v.get(
        "potential_scale",
        "a number in (0, 1000]",
        lambda x: _is_number(x) and 0 < x <= 1000,
        defaults.potential_scale,
    )
    return VerifierConfig(name, classifier, version, max_candidates, float(scale))


def _parse_speech_section(f: _Fields, kind: str) -> dict[str, object]:
    """speech (kind speech only): its network, grid levels, voices and text limits."""
    if kind != "speech":
        if "speech" in f.data:
            raise f.error("speech", f"absent: a {kind!r} model has no speech section")
        return {}
    raw = f.get("speech", "a mapping of SpeechSpec fields", lambda v: True)
    try:
        speech = parse_speech(raw)
    except ValueError as err:
        raise RepositoryError(f"{f.path}: speech: {err}") from None
    if speech.vocoder != GRIFFIN_LIM:  # the shared vocoder exists and takes these mels
        where = f"{f.path}: speech.vocoder"
        try:
            vocoder = read_vocoder(f.path.parent.parent, speech.vocoder)
        except RepositoryError as err:
            raise RepositoryError(f"{where}: {err}") from None
        check_fits(vocoder, speech.sample_rate, speech.hop, speech.network.n_mels, where)
    return {"speech": speech}


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


def _parse_grids(f: _Fields, sampling: SamplingSpec) -> dict[str, dict[int, TunedGrid]]:
    """grids (written by `fewstep tune`): sampler -> steps -> a TunedGrid mapping whose
    sigmas are steps + 1 finite levels in [0, sampling.sigma_max], strictly decreasing,
    positive but for the last (0, or a positive level the sample ends at), and whose
    optional `orders` is a schedule the sampler can run (samplers.check_orders)."""
    raw = f.get("grids", "a mapping of sampler -> steps -> grid", lambda v: True, {})
    outer = _Fields(f.path, raw, "grids.", list(sampling.samplers))
    grids: dict[str, dict[int, TunedGrid]] = {}
    for sampler, by_steps in outer.data.items():
        what = f"a mapping of step counts (integers) -> grid, for sampler {sampler}"
        if not isinstance(by_steps, dict) or not by_steps:
            raise outer.error(sampler, f"a non-empty {what}")
        need = INFO[sampler].min_steps({})
        grids[sampler] = {}
        for steps, entry in by_steps.items():
            where = f"grids.{sampler}.{steps}"
            if not _is_int(steps) or not need <= steps <= sampling.max_steps:
                expected = f"a step count in {need}..{sampling.max_steps} (sampling.max_steps)"
                raise RepositoryError(f"{f.path}: {where}: the key must be {expected}")
            grid = _parse_grid(f.path, entry, f"{where}.", steps, sampling)
            if grid.orders is not None:
                try:
                    check_orders(sampler, grid.orders, steps, grid.sigmas[-1] == 0)
                except SamplerError as err:
                    raise RepositoryError(f"{f.path}: {where}.orders: {err}") from None
            grids[sampler][steps] = grid
    return grids


def _parse_grid(path: Path, data: object, prefix: str, steps: int, s: SamplingSpec) -> TunedGrid:
    g = _Fields(path, data, prefix, list(TunedGrid.__dataclass_fields__))
    sigmas = g.get(
        "sigmas",
        f"a list of {steps + 1} numbers (steps + 1 noise levels, noisiest first)",
        lambda v: isinstance(v, list) and len(v) == steps + 1,
    )
    for i, v in enumerate(sigmas):
        last = i == steps
        lo = "0 <=" if last else "0 <"
        if not _is_number(v) or not (v >= 0 if last else v > 0) or v > s.sigma_max:
            expected = f"a finite number with {lo} sigma <= sigma_max ({s.sigma_max})"
            raise g.error(f"sigmas[{i}]", expected, v)
        if i and v >= sigmas[i - 1]:
            expected = f"below sigmas[{i - 1}] ({sigmas[i - 1]}): a grid strictly decreases"
            raise g.error(f"sigmas[{i}]", expected, v)
    counts = {k: g.integer(k, 1) for k in ("n_search", "n_eval")}
    scores = {
        k: g.number(k, "a finite number >= 0", lambda v: v >= 0) for k in ("fd_before", "fd_after")
    }
    scores |= {
        k: g.number(k, "a number in 0..1", lambda v: 0 <= v <= 1)
        for k in ("accuracy_before", "accuracy_after")
    }
    orders = g.get(
        "orders",
        f"a list of {steps} solver orders (one per step, integers from 1)",
        lambda v: isinstance(v, list) and len(v) == steps and all(_is_int(o) for o in v),
        None,
    )
    return TunedGrid(
        sigmas=tuple(float(v) for v in sigmas),
        orders=None if orders is None else tuple(orders),
        objective=g.text("objective"),
        seed=g.integer("seed", 0),
        **counts,
        **scores,
    )
