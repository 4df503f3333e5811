"""Admission: the one place a request becomes a Job and a result becomes an outcome.

Every front end (OpenAI images and speech, the jobs API, OIP over HTTP and gRPC)
translates its wire format into a protocol-neutral `Request` and calls `admit` (resolve
the model and version, check the request against the spec and its modality, build the
Job), then `submit` (queue it) or `run` (queue it, wait for its one result, and turn a
failure into the error its client sees). The modality (engines.modalities) knows what
differs between images and speech; nothing here branches on a model's kind.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from engines.modalities import InputError, Modality, modality_named, modality_of
from engines.samplers import INFO
from service import capacity
from service.errors import (
    Conflict,
    DeadlineExceeded,
    FewstepError,
    InvalidRequest,
    JobFailed,
    QueueFull,
)
from service.jobs import Job, JobResult, JobState
from service.state import ServiceState


@dataclass
class Request:
    """A generation request as a front end hands it over."""

    model: str | None  # "name" or "name@version"; None: the only model served
    fields: dict[str, Any]  # the modality's own fields (see Modality.parse)
    modality: str | None = None  # what the endpoint serves; None: whatever the model makes
    sampler: str | None = None
    steps: int | None = None
    seed: int | None = None
    deadline_ms: int | None = None
    priority: int = 0
    preview: bool = False
    output_format: str | None = None  # None: the modality's default
    tensor_output: bool = False  # raw tensors (OIP) instead of media files
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Dialect:
    """How a front end names things in the errors admission raises for it."""

    deadline: str = "deadline_ms"  # what the client raises to allow more time
    deadline_param: str | None = "deadline_ms"
    on_timeout: str = "raise deadline_ms or use POST /v1/jobs"
    subject: str = "job"


OPENAI = Dialect()
OIP = Dialect(
    deadline="the 'timeout' parameter",
    deadline_param=None,
    on_timeout="raise the 'timeout' parameter or lower steps",
    subject="request",
)


@dataclass
class Admitted:
    """A job admitted, with its model's spec and modality (for the response)."""

    job: Job
    spec: Any
    modality: Modality


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


def _check_modality(state: ServiceState, spec, modality: Modality, wanted: str | None) -> None:
    if wanted is None or wanted == modality.name:
        return
    want = modality_named(wanted)
    others = sorted(
        name
        for name, versions in state.specs.items()
        if modality_of(next(iter(versions.values()))).name == wanted
    )
    raise InvalidRequest(
        f"model {spec.name} makes {modality.noun}, not {want.noun}; use one of {others} "
        f"(or {modality.endpoint} for {spec.name})",
        param="model",
    )


def admit(state: ServiceState, req: Request) -> Admitted:
    """Validate a request against its model and modality and make its Job.

    Every refusal is an InvalidRequest / UnknownModel that says what to change.
    """
    spec = state.spec(req.model)
    modality = modality_of(spec)
    _check_modality(state, spec, modality, req.modality)
    try:
        output_format = modality.output_format(req.output_format, req.tensor_output)
        inputs, n = modality.parse(spec, req.fields)
    except InputError as err:
        raise InvalidRequest(err.message, param=err.param) from None
    sampler, steps = sampler_and_steps(spec, req.sampler, req.steps)
    now = time.time()
    job = Job(
        model=spec.name,
        version=spec.version,
        inputs=inputs,
        n=n,
        sampler=sampler,
        steps=steps,
        seed=secrets.randbits(63) if req.seed is None else req.seed,
        deadline=None if req.deadline_ms is None else now + req.deadline_ms / 1000,
        priority=req.priority,
        preview=req.preview,
        output_format=output_format,
        idempotency_key=req.idempotency_key,
        submit_time=now,
        cost=capacity.cost(modality, spec, inputs, n, sampler, steps),
    )
    return Admitted(job, spec, modality)


async def submit(state: ServiceState, job: Job, fingerprint: str = "") -> tuple[Job, bool]:
    """Queue a job: (the job, True) or, for a repeated idempotency key, (the first, False).
    Refuses (429) a job whose predicted wait is too long (service.capacity)."""
    try:
        await capacity.check(state.queue, state.settings, job)
        return await state.queue.submit(job, fingerprint)
    except QueueFull as exc:
        state.metrics.rejected.labels(exc.reason).inc()
        raise


def failure(result: JobResult, dialect: Dialect = OPENAI) -> FewstepError:
    """The error a client sees for a job that did not succeed."""
    if result.state is JobState.CANCELED:
        return Conflict(f"the {dialect.subject} was canceled before it finished")
    if result.error_code == "deadline_exceeded":
        return DeadlineExceeded(
            f"{result.error}; raise {dialect.deadline} or lower steps",
            param=dialect.deadline_param,
        )
    if result.error_code == "invalid_parameter":
        return InvalidRequest(result.error or "invalid request")
    return JobFailed(result.error or "generation failed")


async def run(state: ServiceState, job: Job, endpoint: str, dialect: Dialect = OPENAI) -> JobResult:
    """Submit a job, wait for its one result and return it if it succeeded; else raise
    the error its client sees. Counts the request in the metrics either way."""
    begin = time.perf_counter()
    try:
        job, _ = await submit(state, job)
        wait = state.settings.request_timeout_s
        if job.deadline is not None:
            wait = min(wait, max(job.deadline - time.time(), 0) + 1.0)
        result = await state.queue.result(job.id, wait)
        if result is None:
            await state.queue.cancel(job.id)
            raise DeadlineExceeded(
                f"no result within {wait:.1f} s; {dialect.on_timeout}",
                param=dialect.deadline_param,
            )
        if result.state is not JobState.SUCCEEDED:
            raise failure(result, dialect)
    except FewstepError as exc:
        state.metrics.observe_request(job.model, job.sampler, endpoint, str(exc.status), None)
        raise
    state.metrics.observe_request(
        job.model, job.sampler, endpoint, "200", time.perf_counter() - begin
    )
    return result
