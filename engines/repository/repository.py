"""The Repository: every model under one root folder, read and checked when it opens.

Layout (Triton-like): `<root>/<name>/model.yaml` describes the model; numeric folders
`<root>/<name>/<version>/` hold what a version runs (weights, statistics, model card).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engines.nets import UNet
from engines.repository.kinds import KINDS, load_weights
from engines.repository.model_yaml import parse_model_yaml
from engines.repository.spec import LoadedModel, ModelNotFoundError, ModelSpec, RepositoryError
from engines.runtimes.base import RuntimeNet, batch_buckets
from engines.runtimes.export import EngineCache, Progress, network_io
from engines.runtimes.quantize import Calibration
from engines.runtimes.select import EngineContext, Selection, select
from engines.verifiers import Verifier, VerifierError, load_verifier

MODEL_FILE = "model.yaml"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")


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
        latency_curve: str | None = None,
        ungated_int8: bool | None = None,
    ) -> LoadedModel:
        """Read a version's files, check them against model.yaml, return the runnable model.

        A network runs on the first runtime of spec.runtimes (or of `runtimes`, which
        overrides it) that loads on `device`, artifacts built into `cache` as needed; the
        rest of the model moves there too.
        """
        spec = self.spec(name, version)
        folder = self._entry(name).folder / str(spec.version)
        chosen: list[Selection] = []
        options = {
            "device": device,
            "cache": cache,
            "threads": threads,
            "progress": progress,
            "latency_curve": latency_curve,
            "ungated_int8": ungated_int8,  # the INT8 quality gate loads its candidate
        }

        def wrap(net: torch.nn.Module) -> RuntimeNet:
            ctx = _engine_context(spec, folder, net, precision=spec.precision, **options)
            chosen.append(select(runtimes or spec.runtimes, ctx))
            return RuntimeNet(chosen[-1].runtime, null_label=spec.network.classes)

        parts = KINDS[spec.kind].load(spec, folder, wrap)
        verifier = self._verifier(spec)
        engine = chosen[0] if chosen else None
        model = LoadedModel(
            spec,
            parts.denoiser,
            parts.gaussian,
            fingerprint(parts.files),
            engine.runtime.name if engine else "torch",
            parts.decoder,
            (*parts.modules, *getattr(verifier, "modules", ())),
            engine,
            parts.speech,
            verifier,
        )
        return model.to(device) if device != "cpu" else model

    def _verifier(self, spec: ModelSpec) -> Verifier | None:
        """model.yaml's verifier, loaded from the repository root (its _classifiers/)."""
        if spec.verifier is None:
            return None
        entry = self._entry(spec.name)
        try:
            return load_verifier(spec.verifier, entry.folder.parent, spec)
        except VerifierError as err:
            raise RepositoryError(f"{entry.folder / MODEL_FILE}: verifier: {err}") from None

    def engine_context(self, name: str, version: int | None = None, **options) -> EngineContext:
        """A version's network (fp32, on the CPU) with what building its engines needs;
        `options` are EngineContext fields (device, precision, cache, threads, force, ...)."""
        spec = self.spec(name, version)
        if spec.network is None:
            raise RepositoryError(f"model {name!r} (kind {spec.kind!r}) has no network to compile")
        folder = self._entry(name).folder / str(spec.version)
        net = load_weights(
            UNet(spec.network), folder / "weights.safetensors", "the network weights"
        )
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
        calibration=Calibration.for_spec(spec),
        **{"cache": EngineCache(), **options},
    )
