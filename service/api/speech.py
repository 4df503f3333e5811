"""POST /v1/audio/speech: the OpenAI audio API (`client.audio.speech.create`), answered
with the audio bytes; speech jobs share the queue and the batching worker with images."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import Response

from service import admission
from service.schemas import SpeechRequest

from .common import Caller, State, speech_request

router = APIRouter(tags=["openai"])


@router.post("/v1/audio/speech")
async def create_speech(req: SpeechRequest, state: State, caller: Caller) -> Response:
    state.require_ready()
    begin = time.perf_counter()
    job = (await admission.accept(state, speech_request(req), caller)).job
    result = await admission.run(state, job, "speech", principal=caller)
    seconds = time.perf_counter() - begin
    audio = result.info
    rtf = seconds / audio.duration if audio.duration else 0.0
    headers = {
        "x-fewstep-model": f"{job.model}@{job.version}",
        "x-fewstep-sampler": job.sampler,
        "x-fewstep-steps": str(job.steps),
        "x-fewstep-nfe": str(result.nfe),
        "x-fewstep-seed": str(job.seed),
        "x-fewstep-sample-rate": str(audio.sample_rate),
        "x-fewstep-audio-seconds": f"{audio.duration:.3f}",
        "x-fewstep-real-time-factor": f"{rtf:.4f}",
        "x-fewstep-fingerprint": result.fingerprint,
    }
    return Response(result.outputs[0], media_type=result.media_type, headers=headers)
