"""POST /v1/images/generations: the OpenAI Images API, answered synchronously."""

from __future__ import annotations

import base64
import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.errors import (
    Conflict,
    DeadlineExceeded,
    FewstepError,
    InvalidRequest,
    JobFailed,
    QueueFull,
)
from service.jobs import Job, JobResult, JobState
from service.schemas import GenerationRequest, ImageData, ImagesResponse, Timings

from .state import ServiceState, State, build_job

router = APIRouter(tags=["openai"])


def image_data(job: Job, result: JobResult, label: str | None) -> list[ImageData]:
    return [
        ImageData(b64_json=base64.b64encode(png).decode(), revised_prompt=label, seed=seed)
        for png, seed in zip(result.outputs, result.seeds, strict=True)
    ]


def timings(result: JobResult) -> Timings:
    return Timings(
        queue_seconds=result.queue_seconds,
        compute_seconds=result.compute_seconds,
        total_seconds=result.total_seconds,
        forward_seconds=result.forward_seconds,
    )


def raise_for_failure(result: JobResult) -> None:
    """Map a job that did not succeed to the error its client sees."""
    if result.state is JobState.CANCELED:
        raise Conflict("the job was canceled before it finished")
    if result.error_code == "deadline_exceeded":
        raise DeadlineExceeded(
            f"{result.error}; raise deadline_ms or lower steps", param="deadline_ms"
        )
    if result.error_code == "invalid_parameter":
        raise InvalidRequest(result.error or "invalid request")
    raise JobFailed(result.error or "generation failed")


async def submit(state: ServiceState, job: Job, fp: str) -> tuple[Job, bool]:
    try:
        return await state.queue.submit(job, fp)
    except QueueFull:
        state.metrics.rejected.labels("queue_full").inc()
        raise


async def run_job(state: ServiceState, job: Job, endpoint: str) -> tuple[Job, JobResult]:
    """Submit a job and wait for its one result; an error the client sees if it failed."""
    job, _ = await submit(state, job, "")
    wait = state.settings.request_timeout_s
    if job.deadline is not None:
        wait = min(wait, max(job.deadline - time.time(), 0) + 1.0)
    try:
        result = await state.queue.result(job.id, wait)
        if result is None:
            await state.queue.cancel(job.id)
            raise DeadlineExceeded(
                f"no result within {wait:.1f} s; raise deadline_ms or use POST /v1/jobs",
                param="deadline_ms",
            )
        if result.state is not JobState.SUCCEEDED:
            raise_for_failure(result)
    except FewstepError as exc:
        state.metrics.observe_request(job.model, job.sampler, endpoint, str(exc.status), None)
        raise
    return job, result


@router.post("/v1/images/generations", response_model=ImagesResponse)
async def generate_images(req: GenerationRequest, state: State) -> JSONResponse:
    state.require_ready()
    begin = time.perf_counter()
    job, result = await run_job(state, build_job(req, state), "images")
    spec = state.spec(f"{job.model}@{job.version}")
    label = spec.labels[job.labels[0]] if job.labels else None
    state.metrics.observe_request(
        job.model, job.sampler, "images", "200", time.perf_counter() - begin
    )
    # Built as a plain dict: this is the hot path, and FastAPI would validate the model
    # again on the way out. ImagesResponse stays the documented schema.
    data = [
        {"b64_json": base64.b64encode(png).decode(), "revised_prompt": label, "seed": seed}
        for png, seed in zip(result.outputs, result.seeds, strict=True)
    ]
    return JSONResponse(
        {
            "created": int(job.submit_time),
            "data": data,
            "model": f"{job.model}@{job.version}",
            "sampler": job.sampler,
            "steps": job.steps,
            "nfe": result.nfe,
            "timings": timings(result).model_dump(),
            "runtime": result.runtime,
            "fingerprint": result.fingerprint,
        }
    )
