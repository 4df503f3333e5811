"""POST /v1/images/generations: the OpenAI Images API, answered synchronously."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service import admission
from service.schemas import GenerationRequest, ImagesResponse
from service.security import Principal
from service.state import ServiceState

from .common import Caller, State, image_items, image_request, timings, usage

router = APIRouter(tags=["openai"])
PATH = "/v1/images/generations"


@router.post(PATH, response_model=ImagesResponse)
async def generate_images(req: GenerationRequest, state: State, caller: Caller) -> JSONResponse:
    # service/api/fastpath.py answers this route before the router on the hot path; both
    # run images_body
    return JSONResponse(await images_body(state, req, caller))


async def images_body(state: ServiceState, req: GenerationRequest, caller: Principal) -> dict:
    """The images response's body for a validated request from an authenticated caller."""
    state.require_ready()
    admitted = await admission.accept(state, image_request(req), caller)
    job = admitted.job
    result = await admission.run(state, job, "images", principal=caller)
    label = job.inputs.revised_prompt(admitted.spec)
    # Built as a plain dict: this is the hot path, and FastAPI would validate the model
    # again on the way out. ImagesResponse stays the documented schema.
    return {
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
