"""ServiceState: what every front end and admission share (settings, queue, metrics, the
model specs and readiness), and the one resolver of a model name and version."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.config import Settings
from service.errors import InvalidRequest, NotReady, UnknownModel
from service.metrics import Metrics
from service.queue.base import JobQueue


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
    ready: bool = False

    def require_ready(self) -> None:
        if not self.ready:
            raise NotReady("models are still loading; retry shortly", retry_after=2)

    def resolve(self, name: str, version: str = "", param: str | None = None):
        """The ModelSpec of a model name and version text ("" is the default version)."""
        versions = self.specs.get(name)
        if versions is None:
            raise UnknownModel(
                f"unknown model {name!r}; available: {sorted(self.specs)}", param=param
            )
        if not version:
            return versions[self.default_versions[name]]
        if not version.isdigit() or int(version) not in versions:
            raise UnknownModel(
                f"model {name!r} has no version {version!r}; versions: "
                f"{[str(v) for v in sorted(versions)]}",
                param=param,
            )
        return versions[int(version)]

    def spec(self, model: str | None):
        """Resolve 'name' or 'name@version' (or the only model) to a ModelSpec."""
        if model is None:
            if len(self.specs) == 1:
                model = next(iter(self.specs))
            else:
                raise InvalidRequest(
                    f"model is required; choose one of {sorted(self.specs)}", param="model"
                )
        name, _, version = model.partition("@")
        return self.resolve(name, version, param="model")
