"""Start-up shared by `fewstep serve` and `fewstep worker`: settings, device, models, process.

Reading the settings and checking the repository (fail fast with one line), choosing the
device, loading and warming the models (or only their specs, in an API-only process) and
tuning the process all happen here, so the worker never imports the HTTP app and the two
commands cannot drift apart.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field

from service.config import Settings
from service.metrics import Metrics

log = logging.getLogger("fewstep")


class BootError(Exception):
    """Settings or a repository that cannot work; the message is the one line to print."""


def settings(overrides: dict) -> Settings:
    """Settings from the environment with the command line's overrides (None: not given),
    and a repository that opens; BootError says what is wrong."""
    from pydantic import ValidationError

    from engines.repository import Repository, RepositoryError
    from service.security import KeyFileError, KeyStore

    try:
        result = Settings(**{k: v for k, v in overrides.items() if v is not None})
        Repository(result.model_repo).specs()  # fail fast on a broken repository
        KeyStore.from_settings(result.api_keys, result.api_key_file)  # and a bad key file
        grpc_tls(result)
    except (ValidationError, RepositoryError, KeyFileError, OSError) as err:
        raise BootError(str(err)) from None
    return result


def grpc_tls(settings: Settings) -> tuple[bytes, bytes] | None:
    """(PEM certificate chain, PEM private key) for gRPC over TLS, or None (plaintext)."""
    if settings.grpc_tls_cert is None or settings.grpc_tls_key is None:
        return None
    return settings.grpc_tls_cert.read_bytes(), settings.grpc_tls_key.read_bytes()


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(message)s")


def resolve_device(device: str) -> str:
    """'auto' is CUDA when torch sees a GPU, else the CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fewstep: FEWSTEP_DEVICE=cuda but torch sees no GPU; use auto or cpu")
    return device


@dataclass
class Models:
    """What a process serves: loaded models (empty in an API-only process) and the specs
    requests are checked against."""

    loaded: dict = field(default_factory=dict)  # (name, version) -> LoadedModel
    specs: dict = field(default_factory=dict)  # name -> version -> ModelSpec
    default_versions: dict[str, int] = field(default_factory=dict)

    def runtimes(self) -> dict[str, dict]:
        """{name: the runtime of its default version} (what /v1/models shows)."""
        return {
            name: model.describe_runtime()
            for (name, version), model in self.loaded.items()
            if self.default_versions.get(name) == version
        }

    @classmethod
    def of(cls, loaded: dict) -> Models:
        """Already loaded models (test fixtures): the highest version is the default."""
        specs: dict = {}
        for (name, version), model in loaded.items():
            specs.setdefault(name, {})[version] = model.spec
        return cls(loaded, specs, {name: max(v) for name, v in specs.items()})


def _repository(settings: Settings):
    from engines.repository import Repository

    repo = Repository(settings.model_repo)
    names = settings.models or repo.names()
    unknown = sorted(set(names) - set(repo.names()))
    if unknown:
        raise SystemExit(
            f"fewstep: unknown model(s) {unknown} in {settings.model_repo}; have {repo.names()}"
        )
    return repo, names


def load_specs(settings: Settings) -> Models:
    """The specs of the models to serve, without their weights (an API-only process)."""
    repo, names = _repository(settings)
    models = Models()
    for spec in repo.specs():
        if spec.name in names:
            models.specs.setdefault(spec.name, {})[spec.version] = spec
            models.default_versions[spec.name] = repo.default_version(spec.name)
    return models


def load_models(settings: Settings, metrics: Metrics) -> Models:
    """Load every model (and version) to serve on the configured device and warm it up."""
    repo, names = _repository(settings)
    device = resolve_device(settings.device)
    set_threads(settings)
    models = Models()
    for spec in repo.specs():
        if spec.name not in names:
            continue
        begin = time.perf_counter()
        # builds missing engine artifacts (logged); a runtime that fails falls back
        model = repo.load(
            spec.name,
            spec.version,
            device=device,
            runtimes=[settings.runtime] if settings.runtime else None,
            latency_curve=settings.latency_curve,
            threads=runtime_threads(settings),
        )
        if settings.warmup:
            model.warmup()
        metrics.model_load.labels(spec.name).set(time.perf_counter() - begin)
        models.loaded[spec.name, spec.version] = model
        models.specs.setdefault(spec.name, {})[spec.version] = spec
        models.default_versions[spec.name] = repo.default_version(spec.name)
    return models


def set_threads(settings: Settings) -> None:
    """torch's intra-op threads in this process (`torch_threads`; 0 keeps torch's default).

    torch parallelises any op over 32k elements: a sampler step on a batch of 128 28x28
    images already qualifies. On the 2-core CI machine with another process busy, such an
    op took 23 ms on torch's default two threads and 0.12 ms on one (the pool's threads
    wait for each other at every op's barrier), and the waiting burns the core that the
    event loop and the other requests need.
    """
    import torch

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)


def runtime_threads(settings: Settings) -> int:
    """ONNX Runtime's intra-op threads per model: `runtime_threads`, else the CPUs this
    process may run on (its affinity mask, which a container's cpuset narrows)."""
    return settings.runtime_threads or len(os.sched_getaffinity(0)) or 1


def mark_ready(models: Models, metrics: Metrics) -> None:
    """model_ready and model_runtime_info for every loaded model."""
    for (name, version), model in models.loaded.items():
        metrics.model_ready.labels(name).set(1)
        if models.default_versions[name] == version:
            metrics.set_runtime(name, model.runtime)


def tune_gc() -> None:
    """Keep the garbage collector off the request path.

    Every request leaves tensors, events and result bytes behind, and CPython's default
    thresholds then run full collections over everything loaded at start-up every few
    hundred requests: at 120 req/s those pauses dominated p99 (154 ms -> 38 ms measured
    with this change). Freeze what start-up made and collect the young generation less
    often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
