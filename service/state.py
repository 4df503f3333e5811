"""ServiceState: what every front end and admission share (settings, queue, metrics, the
model specs and readiness, who may call and their quotas), and the one resolver of a model
name and version."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from service.config import Settings
from service.errors import InvalidRequest, NotReady, UnknownModel
from service.metrics import Metrics
from service.parsing import parse_uint
from service.queue.base import JobQueue
from service.security import (
    InFlight,
    KeyStore,
    MemoryInFlight,
    MemoryRateLimiter,
    RateLimiter,
)


@dataclass
class ServiceState:
    settings: Settings
    queue: JobQueue
    metrics: Metrics
    specs: dict[str, dict[int, object]] = field(
        default_factory=dict
    )  # name -> version -> ModelSpec
    default_versions: dict[str, int] = field(default_factory=dict)
    # name -> the runtime running its default version (empty in an API-only process)
    runtimes: dict[str, dict] = field(default_factory=dict)
    # (name, version) -> LoadedModel where this process loaded weights (admission checks
    # a request's cost on it; empty in an API-only process)
    loaded: dict = field(default_factory=dict)
    ready: bool = False
    draining: bool = False  # SIGTERM received: /readyz fails while requests are still served
    broken: str | None = None  # why the worker stopped for good (readiness then fails)
    keys: KeyStore = field(default_factory=lambda: KeyStore([]))
    rate: RateLimiter = field(default_factory=MemoryRateLimiter)
    in_flight: InFlight = field(default_factory=MemoryInFlight)
    # tasks that release a job's quota when it finishes (kept so they are not collected)
    watchers: set[asyncio.Task] = field(default_factory=set)

    @property
    def serving(self) -> bool:
        """Whether this replica should get traffic: ready, not draining, the worker not
        stopped (what /readyz says, less its queue check, and what gRPC health says)."""
        return self.ready and not self.draining and self.broken is None

    def require_ready(self) -> None:
        if self.broken is not None:
            raise NotReady(self.broken, retry_after=5)
        if not self.ready:
            raise NotReady("models are still loading; retry shortly", retry_after=2)

    def resolve(self, name: str, version: str = "", param: str | None = None):
        """The ModelSpec of a model name and version text ("" is the default version).

        A version that is not 1 to 18 ASCII digits (parse_uint) is as unknown as a number
        the model does not have: 404 listing the versions it has, never a 500."""
        versions = self.specs.get(name)
        if versions is None:
            raise UnknownModel(
                f"unknown model {name!r}; available: {sorted(self.specs)}", param=param
            )
        if not version:
            return versions[self.default_versions[name]]
        try:
            number = parse_uint(version, name="version")
        except InvalidRequest:
            number = None
        if number not in versions:
            raise UnknownModel(
                f"model {name!r} has no version {version!r}; versions: "
                f"{[str(v) for v in sorted(versions)]}",
                param=param,
            )
        return versions[number]

    def spec(self, model: str | None):
        """Resolve 'name' or 'name@version' (or the only model) to a ModelSpec."""
        if model is None:
            if len(self.specs) == 1:
                model = next(iter(self.specs))
            else:
                raise InvalidRequest(
                    f"model is required; choose one of {sorted(self.specs)}", param="model"
                )
        name, at, version = model.partition("@")
        if at and not version:
            raise InvalidRequest(
                f"model {model!r} names no version after '@'; write {name!r} or '{name}@VERSION'",
                param="model",
            )
        return self.resolve(name, version, param="model")
