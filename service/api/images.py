"""POST /v1/images/generations: the OpenAI Images API, answered synchronously."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service import admission
from service.schemas import GenerationRequest, ImagesResponse

from .common import Caller, State, image_items, image_request, timings, usage

router = APIRouter(tags=["openai"])


@router.post("/v1/images/generations", response_model=ImagesResponse)
async def generate_images(req: GenerationRequest, state: State, caller: Caller) -> JSONResponse:
    state.require_ready()
    admitted = await admission.accept(state, image_request(req), caller)
    job = admitted.job
    result = await admission.run(state, job, "images", principal=caller)
    label = job.inputs.revised_prompt(admitted.spec)
    # Built as a plain dict: this is the hot path, and FastAPI would validate the model
    # again on the way out. ImagesResponse stays the documented schema.
    return JSONResponse(
        {
            "created": int(job.submit_time),
            "data": image_items(result, label),
            "model": f"{job.model}@{job.version}",
            "sampler": job.sampler,
            "steps": job.steps,
            "grid": getattr(result.info, "grid", ""),
            "quality": "auto" if job.step_budgets else "fixed",
            "nfe": result.nfe,
            **usage(job, result),
            "timings": timings(result).model_dump(),
            "runtime": result.runtime,
            "fingerprint": result.fingerprint,
        }
    )
