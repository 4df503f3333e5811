"""What the HTTP front ends share: the state and caller dependencies, and the translation
of the OpenAI-style request bodies into admission's protocol-neutral Request."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import Depends, Request

from service.admission import Request as Admit
from service.errors import InvalidRequest
from service.jobs import Job, JobResult
from service.schemas import GenerationRequest, SpeechRequest, Timings
from service.security import Principal
from service.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    return request.app.state.fewstep


State = Annotated[ServiceState, Depends(get_state)]


async def get_principal(request: Request) -> Principal:
    """The caller, from `Authorization: Bearer KEY`; 401 when a key is needed and this is
    not one (the anonymous principal where no key is configured). One dependency with no
    sub-dependencies: FastAPI's dependency solving is a large share of a request's CPU on
    the hot path, so the bearer scheme is documented by service/api/openapi.py instead of
    a `HTTPBearer` dependency."""
    return request.app.state.fewstep.keys.authenticate(request.headers.get("authorization"))


Caller = Annotated[Principal, Depends(get_principal)]

_COMMON = ("model", "sampler", "steps", "seed", "deadline_ms", "priority", "quality")


def image_request(req: GenerationRequest, idempotency_key: str | None = None) -> Admit:
    """An OpenAI Images body (or a POST /v1/jobs body) as an admission Request."""
    if req.response_format == "url":
        raise InvalidRequest(
            "response_format 'url' is not supported: images come back inline; use 'b64_json'",
            param="response_format",
        )
    return Admit(
        **{k: getattr(req, k) for k in _COMMON},
        fields=req.model_dump(
            include={
                "prompt",
                "n",
                "size",
                "guidance_scale",
                "teleport",
                "best_of",
                "steering",
                "grid",
            }
        ),
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


def image_items(result: JobResult, label: str | None) -> list[dict]:
    """The `data` items of an images response; best_of / steering add verifier_score."""
    scores = getattr(result.info, "scores", None) or [None] * len(result.outputs)
    items = []
    for text, seed, score in zip(result.base64_outputs(), result.seeds, scores, strict=True):
        item = {"b64_json": text, "revised_prompt": label, "seed": seed}
        if score is not None:
            item["verifier_score"] = score
        items.append(item)
    return items


def usage(job: Job, result: JobResult) -> dict:
    """total_nfe (rows x evaluations, every candidate and guidance row included) and, for
    best_of / steering, how the request searched."""
    info = result.info
    searched = info.searched() if info is not None else None
    scaling = None
    if searched is not None:
        scaling = {
            "method": searched[0],
            "candidates": info.candidates,
            "resample_every": job.inputs.resample_every or None,
            "resamples": info.resamples,
            "verifier": info.verifier,
        }
    return {"total_nfe": job.rows * result.nfe, "scaling": scaling}


def timings(result: JobResult) -> Timings:
    return Timings(
        queue_seconds=result.queue_seconds,
        compute_seconds=result.compute_seconds,
        total_seconds=result.total_seconds,
        forward_seconds=result.forward_seconds,
    )
