"""What every route needs: settings, queue, metrics and the model specs, on app.state."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from engines.samplers import INFO
from service.config import Settings
from service.errors import InvalidRequest, NotReady, UnknownModel
from service.jobs import Job
from service.metrics import Metrics
from service.queue.base import JobQueue
from service.schemas import GenerationRequest


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
    draining: bool = False  # SIGTERM received: /readyz fails while requests are still served

    def require_ready(self) -> None:
        if not self.ready:
            raise NotReady("models are still loading; retry shortly", retry_after=2)

    def spec(self, model: str | None):
        """Resolve 'name' or 'name@version' (or the only model) to a ModelSpec."""
        if model is None:
            if len(self.specs) == 1:
                model = next(iter(self.specs))
            else:
                raise InvalidRequest(
                    f"model is required; choose one of {sorted(self.specs)}", param="model"
                )
        name, _, version_text = model.partition("@")
        if name not in self.specs:
            raise UnknownModel(
                f"unknown model {name!r}; available: {sorted(self.specs)}", param="model"
            )
        versions = self.specs[name]
        if not version_text:
            return versions[self.default_versions[name]]
        if not version_text.isdigit() or int(version_text) not in versions:
            raise UnknownModel(
                f"model {name!r} has no version {version_text!r}; versions: {sorted(versions)}",
                param="model",
            )
        return versions[int(version_text)]


async def get_state(request: Request) -> ServiceState:
    return request.app.state.fewstep


State = Annotated[ServiceState, Depends(get_state)]


def fingerprint(req: GenerationRequest) -> str:
    """What an Idempotency-Key is bound to: the request body, canonicalised."""
    return json.dumps(req.model_dump(), sort_keys=True)


def sampler_and_steps(spec, sampler: str | None, steps: int | None) -> tuple[str, int]:
    """The request's sampler and steps (or the model's defaults), checked against the model."""
    s = spec.sampling
    sampler = sampler or s.default_sampler
    if sampler not in s.samplers:
        raise InvalidRequest(
            f"sampler {sampler!r} is not available for model {spec.name}; use one of "
            f"{list(s.samplers)}",
            param="sampler",
        )
    steps = steps or s.default_steps
    need = INFO[sampler].min_steps({})
    if not need <= steps <= s.max_steps:
        raise InvalidRequest(
            f"steps must be in {need}..{s.max_steps} for sampler {sampler} on model {spec.name}, "
            f"got {steps}",
            param="steps",
        )
    return sampler, steps


def build_job(
    req: GenerationRequest, state: ServiceState, idempotency_key: str | None = None
) -> Job:
    """Validate a generation request against its model and turn it into a Job.

    Every refusal says what to change.
    """
    spec = state.spec(req.model)
    s = spec.sampling
    if spec.kind == "speech":
        raise InvalidRequest(
            f"model {spec.name} makes speech, not images; use POST /v1/audio/speech",
            param="model",
        )
    if req.response_format == "url":
        raise InvalidRequest(
            "response_format 'url' is not supported: images come back inline; use 'b64_json'",
            param="response_format",
        )
    height, width = spec.image_shape[-2], spec.image_shape[-1]
    if req.size is not None and req.size != f"{width}x{height}":
        raise InvalidRequest(
            f"model {spec.name} makes {width}x{height} images; send size '{width}x{height}'",
            param="size",
        )
    if req.n > spec.max_n:
        raise InvalidRequest(
            f"n must be at most {spec.max_n} for model {spec.name}; send several requests for more",
            param="n",
        )
    labels: list[int] = []
    if spec.labels:
        label = spec.label_id(req.prompt)
        if label is None:
            raise InvalidRequest(
                f"prompt {req.prompt!r} is not a class of model {spec.name}; "
                f"use one of {list(spec.labels)} (synonyms: {sorted(spec.synonyms)})",
                param="prompt",
            )
        labels = [label] * req.n
    sampler, steps = sampler_and_steps(spec, req.sampler, req.steps)
    guidance = s.default_guidance if req.guidance_scale is None else req.guidance_scale
    if guidance != 1.0 and not spec.labels:
        raise InvalidRequest(
            "guidance_scale needs a class-conditional model; omit it", param="guidance_scale"
        )
    if guidance > s.max_guidance or (s.max_guidance == 1.0 and guidance != 1.0):
        raise InvalidRequest(
            f"guidance_scale must be at most {s.max_guidance} for model {spec.name}"
            + (" (it has no classifier-free guidance; omit it)" if s.max_guidance == 1.0 else ""),
            param="guidance_scale",
        )
    if req.teleport and s.teleport_sigma is None:
        raise InvalidRequest(
            f"model {spec.name} ships no Gaussian statistics, so teleport is not available",
            param="teleport",
        )
    now = time.time()
    return Job(
        model=spec.name,
        version=spec.version,
        labels=labels,
        n=req.n,
        sampler=sampler,
        steps=steps,
        seed=secrets.randbits(63) if req.seed is None else req.seed,
        guidance_scale=guidance,
        teleport=req.teleport,
        deadline=None if req.deadline_ms is None else now + req.deadline_ms / 1000,
        priority=req.priority,
        preview=req.preview,
        idempotency_key=idempotency_key,
        submit_time=now,
    )
