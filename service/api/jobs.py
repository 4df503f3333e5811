"""The job API: submit (202), status, result, cancel, and server-sent events."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import StreamingResponse

from service import admission
from service.errors import Conflict, InvalidRequest, JobNotFound
from service.jobs import JobState
from service.parsing import parse_uint
from service.schemas import GenerationRequest, ImageData, JobResultView, JobView, Progress
from service.security import Principal

from .common import Caller, State, fingerprint, image_items, image_request, timings, usage

router = APIRouter(tags=["jobs"])


def view(status) -> JobView:
    job = status.job
    return JobView(
        id=job.id,
        status=status.state.value,
        model=job.model,
        version=job.version,
        sampler=job.sampler,
        steps=job.steps,
        quality="auto" if job.step_budgets else "fixed",
        n=job.n,
        seed=job.seed,
        teleport=getattr(job.inputs, "teleport", False),
        priority=job.priority,
        created=job.submit_time,
        position=status.position,
        estimated_start_seconds=status.estimated_start_seconds,
        progress=Progress(step=status.step, steps=status.steps),
        error=status.error,
    )


async def _status(state, job_id: str, caller: Principal):
    """The job's status if it is the caller's; another principal's job is as unknown."""
    status = await state.queue.status(job_id)
    if status is None or status.job.owner != caller.name:
        raise JobNotFound(
            f"no job {job_id!r}; it never existed or has been forgotten", param="job_id"
        )
    return status


@router.post("/v1/jobs", status_code=202, response_model=JobView)
async def submit_job(
    req: GenerationRequest,
    state: State,
    caller: Caller,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobView:
    state.require_ready()
    if idempotency_key is not None and not idempotency_key.strip():
        raise InvalidRequest("Idempotency-Key must not be blank", param="Idempotency-Key")
    admitted = await admission.accept(state, image_request(req, idempotency_key), caller)
    job, created = await admission.submit_owned(state, caller, admitted.job, fingerprint(req))
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.status_code = 200
    return view(await _status(state, job.id, caller))


@router.get("/v1/jobs/{job_id}", response_model=JobView)
async def get_job(job_id: str, state: State, caller: Caller) -> JobView:
    return view(await _status(state, job_id, caller))


@router.get("/v1/jobs/{job_id}/result", response_model=JobResultView)
async def get_result(job_id: str, state: State, caller: Caller, wait: float = 0.0) -> JobResultView:
    """The result once done; `wait` (seconds, at most 60) long-polls for it."""
    if not 0 <= wait <= 60:
        raise InvalidRequest("wait must be between 0 and 60 seconds", param="wait")
    status = await _status(state, job_id, caller)
    result = await state.queue.result(job_id, wait)
    if result is None:
        raise Conflict(
            f"job {job_id} is {status.state.value}; poll GET /v1/jobs/{job_id}, follow "
            f"/v1/jobs/{job_id}/events, or pass ?wait=SECONDS"
        )
    if result.state is not JobState.SUCCEEDED:
        raise admission.failure(result)
    job = status.job
    label = job.inputs.revised_prompt(state.resolve(job.model, str(job.version)))
    return JobResultView(
        id=job.id,
        status="succeeded",
        data=[ImageData(**item) for item in image_items(result, label)],
        nfe=result.nfe,
        grid=getattr(result.info, "grid", None),
        **usage(job, result),
        timings=timings(result),
        runtime=result.runtime,
        fingerprint=result.fingerprint,
    )


@router.delete("/v1/jobs/{job_id}", response_model=JobView)
async def cancel_job(job_id: str, state: State, caller: Caller) -> JobView:
    """Cancel a queued job at once, a running one between two steps."""
    await _status(state, job_id, caller)
    await state.queue.cancel(job_id)
    return view(await _status(state, job_id, caller))


@router.get("/v1/jobs/{job_id}/events")
async def job_events(
    job_id: str,
    state: State,
    caller: Caller,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Server-sent events: queued, started, step (k of N, optional preview), then one of
    succeeded / failed / canceled. Reconnect with Last-Event-ID to resume."""
    await _status(state, job_id, caller)
    after = 0 if last_event_id is None else parse_uint(last_event_id, name="Last-Event-ID")

    async def stream():
        async for event in state.queue.events(job_id, after):
            payload = json.dumps({"job_id": job_id, **event.data})
            yield f"id: {event.seq}\nevent: {event.type}\ndata: {payload}\n\n"

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
