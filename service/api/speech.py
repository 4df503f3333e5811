"""POST /v1/audio/speech: the OpenAI audio API (`client.audio.speech.create`), answered
with the audio bytes; speech jobs share the queue and the batching worker with images."""

from __future__ import annotations

import secrets
import time
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from service.errors import InvalidRequest
from service.jobs import Job

from .images import run_job
from .state import ServiceState, State, sampler_and_steps

router = APIRouter(tags=["openai"])

AUDIO_FORMATS = ("wav", "flac", "pcm", "mp3", "opus", "aac")


class SpeechRequest(BaseModel):
    """OpenAI's speech fields (model, input, voice, response_format, speed) plus fewstep's
    sampler, steps, seed, deadline_ms and priority."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="a speech model, optionally name@version")
    input: str = Field(description="text to speak")
    voice: str = Field("slt", description="a voice of the model, or an OpenAI voice name")
    response_format: Literal["wav", "flac", "pcm", "mp3", "opus", "aac"] | None = None
    speed: float = Field(1.0, ge=0.25, le=4.0, description="speaking rate (durations / speed)")
    instructions: str | None = Field(None, max_length=4096)
    sampler: str | None = None
    steps: int | None = Field(None, ge=1, le=1000)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    deadline_ms: int | None = Field(None, ge=1, le=86_400_000)
    priority: int = Field(0, ge=-10, le=10)


def available_formats() -> list[str]:
    from engines.speech.audio import available_formats as have

    return have()


def check_text(text: str, spec) -> list[str]:
    """The input's sentences; a 400 that says what to change for empty or too long input."""
    from engines.speech.model import split_sentences

    s = spec.speech
    if not text.strip():
        raise InvalidRequest("input is empty; send the text to speak", param="input")
    if len(text) > s.max_chars:
        raise InvalidRequest(
            f"input is {len(text)} characters; model {spec.name} takes at most {s.max_chars} "
            "per request: split the text over several requests",
            param="input",
        )
    sentences = split_sentences(text)
    if len(sentences) > s.max_sentences:
        raise InvalidRequest(
            f"input has {len(sentences)} sentences; model {spec.name} takes at most "
            f"{s.max_sentences} per request: split the text over several requests",
            param="input",
        )
    return sentences


def build_speech_job(req: SpeechRequest, state: ServiceState, output_format: str) -> Job:
    spec = state.spec(req.model)
    if spec.kind != "speech":
        speech = sorted(
            n for n, v in state.specs.items() if next(iter(v.values())).kind == "speech"
        )
        raise InvalidRequest(
            f"model {spec.name} makes images, not speech; use one of {speech}", param="model"
        )
    if spec.speech.voice(req.voice) is None:
        from engines.speech.spec import OPENAI_VOICES

        raise InvalidRequest(
            f"unknown voice {req.voice!r}; model {spec.name} speaks as {list(spec.speech.voices)} "
            f"(OpenAI's voices {OPENAI_VOICES} map onto {spec.speech.voices[0]!r})",
            param="voice",
        )
    if req.instructions:
        raise InvalidRequest(
            "instructions (voice styling) are not supported by fewstep's models; omit them",
            param="instructions",
        )
    sentences = check_text(req.input, spec)
    sampler, steps = sampler_and_steps(spec, req.sampler, req.steps)
    now = time.time()
    return Job(
        model=spec.name,
        version=spec.version,
        labels=[],
        n=len(sentences),
        sampler=sampler,
        steps=steps,
        seed=secrets.randbits(63) if req.seed is None else req.seed,
        deadline=None if req.deadline_ms is None else now + req.deadline_ms / 1000,
        priority=req.priority,
        output_format=output_format,
        text=sentences,
        speed=req.speed,
        submit_time=now,
    )


def output_format(requested: str | None) -> str:
    """The format to encode: the requested one if this machine can, else a clear 400."""
    have = available_formats()
    if requested is None:  # OpenAI's default is mp3
        return "mp3" if "mp3" in have else "wav"
    if requested not in have:
        raise InvalidRequest(
            f"response_format {requested!r} needs an encoder this server does not have; "
            f"use one of {have}",
            param="response_format",
        )
    return requested


@router.post("/v1/audio/speech")
async def create_speech(req: SpeechRequest, state: State) -> Response:
    state.require_ready()
    begin = time.perf_counter()
    fmt = output_format(req.response_format)
    job = build_speech_job(req, state, fmt)
    job, result = await run_job(state, job, "speech")
    seconds = time.perf_counter() - begin
    state.metrics.observe_request(job.model, job.sampler, "speech", "200", seconds)
    rtf = seconds / result.audio_seconds if result.audio_seconds else 0.0
    headers = {
        "x-fewstep-model": f"{job.model}@{job.version}",
        "x-fewstep-sampler": job.sampler,
        "x-fewstep-steps": str(job.steps),
        "x-fewstep-nfe": str(result.nfe),
        "x-fewstep-seed": str(job.seed),
        "x-fewstep-sample-rate": str(result.sample_rate),
        "x-fewstep-audio-seconds": f"{result.audio_seconds:.3f}",
        "x-fewstep-real-time-factor": f"{rtf:.4f}",
        "x-fewstep-fingerprint": result.fingerprint,
    }
    return Response(result.outputs[0], media_type=result.media_type, headers=headers)
