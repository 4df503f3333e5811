"""What the HTTP front ends share: the state dependency, and the translation of the
OpenAI-style request bodies into admission's protocol-neutral Request."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import Depends, Request

from service.admission import Request as Admit
from service.errors import InvalidRequest
from service.jobs import JobResult
from service.schemas import GenerationRequest, SpeechRequest, Timings
from service.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    return request.app.state.fewstep


State = Annotated[ServiceState, Depends(get_state)]

_COMMON = ("model", "sampler", "steps", "seed", "deadline_ms", "priority")


def image_request(req: GenerationRequest, idempotency_key: str | None = None) -> Admit:
    """An OpenAI Images body (or a POST /v1/jobs body) as an admission Request."""
    if req.response_format == "url":
        raise InvalidRequest(
            "response_format 'url' is not supported: images come back inline; use 'b64_json'",
            param="response_format",
        )
    return Admit(
        **{k: getattr(req, k) for k in _COMMON},
        fields=req.model_dump(include={"prompt", "n", "size", "guidance_scale", "teleport"}),
        modality="image",
        preview=req.preview,
        output_format="png",
        idempotency_key=idempotency_key,
    )


def speech_request(req: SpeechRequest) -> Admit:
    """An OpenAI speech body as an admission Request."""
    return Admit(
        **{k: getattr(req, k) for k in _COMMON},
        fields=req.model_dump(include={"input", "voice", "speed", "instructions"}),
        modality="speech",
        output_format=req.response_format,
    )


def fingerprint(req: GenerationRequest) -> str:
    """What an Idempotency-Key is bound to: the request body, canonicalised."""
    return json.dumps(req.model_dump(), sort_keys=True)


def timings(result: JobResult) -> Timings:
    return Timings(
        queue_seconds=result.queue_seconds,
        compute_seconds=result.compute_seconds,
        total_seconds=result.total_seconds,
        forward_seconds=result.forward_seconds,
    )
