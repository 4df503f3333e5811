"""Admission: the one place a request becomes a Job and a result becomes an outcome.

Every front end (OpenAI images and speech, the jobs API, OIP over HTTP and gRPC)
translates its wire format into a protocol-neutral `Request` and calls `admit` (resolve
the model and version, check the request against the spec and its modality, build the
Job), then `submit` (queue it) or `run` (queue it, wait for its one result, and turn a
failure into the error its client sees). The modality (engines.modalities) knows what
differs between images and speech; nothing here branches on a model's kind.

`accept` is what the front ends call: `admit`, then the checks that must wait or block,
each in its own function: the modality's cost check that needs the model (`check_cost`,
off the event loop) and the caller's quotas (`take_quota`). A job's samples in flight are
released when it ends: by `run` once its result is in hand, and for a job submitted to
run on its own (`submit_owned`, POST /v1/jobs) by a task that waits for its result here.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from engines.modalities import InputError, Modality, Unavailable, modality_named, modality_of
from engines.samplers import INFO
from service import capacity
from service.errors import (
    Conflict,
    DeadlineExceeded,
    FewstepError,
    InvalidRequest,
    JobFailed,
    QueueFull,
    QueueUnavailable,
    RateLimited,
    TextFrontendUnavailable,
)
from service.jobs import Job, JobResult, JobState
from service.security import ANONYMOUS, Principal
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
    quality: str = "fixed"  # "auto": admission picks the steps that meet the deadline


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


def admit(state: ServiceState, req: Request, principal: Principal = ANONYMOUS) -> Admitted:
    """Validate a request against its model and modality and make its Job, owned by
    `principal`.

    Every refusal is an InvalidRequest / UnknownModel that says what to change (a priority
    the principal may not use: Forbidden).
    """
    principal.check_priority(req.priority)
    spec = state.spec(req.model)
    modality = modality_of(spec)
    _check_modality(state, spec, modality, req.modality)
    try:
        output_format = modality.output_format(req.output_format, req.tensor_output)
        inputs, n = modality.parse(spec, req.fields)
    except InputError as err:
        raise InvalidRequest(err.message, param=err.param) from None
    sampler, steps = sampler_and_steps(spec, req.sampler, req.steps)
    budgets = auto_budgets(spec, req, sampler) if req.quality == "auto" else ()
    if budgets:  # the budgets its inputs can run with (steering needs steps to resample)
        budgets = tuple(b for b in budgets if _plans(modality, spec, inputs, sampler, b))
        steps = budgets[0] if budgets else steps
    try:
        modality.plan(spec, inputs, sampler, steps)
    except InputError as err:
        raise InvalidRequest(err.message, param=err.param) from None
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
        owner=principal.name,
        submit_time=now,
        cost=capacity.cost(modality, spec, inputs, n, sampler, steps),
        step_budgets=list(budgets),
    )
    return Admitted(job, spec, modality)


def _plans(modality: Modality, spec, inputs, sampler: str, steps: int) -> bool:
    try:
        modality.plan(spec, inputs, sampler, steps)
    except InputError:
        return False
    return True


def auto_budgets(spec, req: Request, sampler: str) -> tuple[int, ...]:
    """The step counts quality "auto" may choose from, largest first (the request's own
    steps are the most it wants); it needs a deadline to choose for."""
    if req.deadline_ms is None:
        raise InvalidRequest(
            'quality "auto" picks the most steps that meet the request\'s deadline; send '
            'deadline_ms (e.g. 1000), or quality "fixed"',
            param="deadline_ms",
        )
    budgets = spec.sampling.budgets(sampler, req.steps)
    if not budgets:  # only when the model's ladder has nothing this sampler can run
        raise InvalidRequest(
            f'quality "auto" has no step budget for sampler {sampler} on model {spec.name} '
            f"(its quality_steps are {list(spec.sampling.quality_steps)}); send steps or "
            "another sampler",
            param="sampler",
        )
    return budgets


async def check_cost(state: ServiceState, admitted: Admitted) -> None:
    """The modality's check of what only the model can tell (speech: frames after the
    front end), in a thread where it may block: the speech front end is a process that
    may stall, and the event loop must not stall with it."""
    spec, modality = admitted.spec, admitted.modality
    model = state.loaded.get((spec.name, spec.version))
    try:
        if modality.may_block:
            await asyncio.to_thread(modality.check, spec, admitted.job.inputs, model)
        else:
            modality.check(spec, admitted.job.inputs, model)
    except InputError as err:
        raise InvalidRequest(err.message, param=err.param) from None
    except Unavailable as err:
        raise TextFrontendUnavailable(str(err), retry_after=1) from None


async def take_quota(state: ServiceState, principal: Principal, job: Job) -> None:
    """One request of the principal's rate, and the job's samples in flight (released by
    `release`); RateLimited (429) when either is spent."""
    try:
        (await state.rate.acquire(principal)).check(principal, "requests")
        (await state.in_flight.acquire(principal, job.id, job.samples)).check(principal, "samples")
    except RateLimited:
        state.metrics.rejected.labels("rate_limited", principal.name).inc()
        raise


async def release(state: ServiceState, principal: Principal, job_id: str) -> None:
    """Give back a job's samples in flight. Never raises: with Redis away the entry
    expires by itself (RedisInFlight's ttl)."""
    with contextlib.suppress(QueueUnavailable):
        await state.in_flight.release(principal, job_id)


async def accept(state: ServiceState, req: Request, principal: Principal = ANONYMOUS) -> Admitted:
    """admit, then the cost check and the quotas: what every front end calls. The job holds
    samples in flight from here on: pass it to `run` or `submit_owned`."""
    admitted = admit(state, req, principal)
    await check_cost(state, admitted)
    await take_quota(state, principal, admitted.job)
    return admitted


async def submit(state: ServiceState, job: Job, fingerprint: str = "") -> tuple[Job, bool]:
    """Queue a job: (the job, True) or, for a repeated idempotency key, (the first, False).
    Refuses (429) a job whose predicted wait is too long (service.capacity)."""
    try:
        spec = state.specs[job.model][job.version]
        queued = await capacity.submit_within(
            state.queue, state.settings, job, fingerprint, spec.max_batch_size
        )
        if job.step_budgets:
            state.metrics.auto_steps.labels(job.model).observe(job.steps)
        return queued
    except QueueFull as exc:
        state.metrics.rejected.labels(exc.reason, job.owner or ANONYMOUS.name).inc()
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
    if result.error_code == "unavailable":
        return TextFrontendUnavailable(result.error or "retry the request", retry_after=1)
    return JobFailed(result.error or "generation failed")


async def submit_owned(
    state: ServiceState, principal: Principal, job: Job, fingerprint: str = ""
) -> tuple[Job, bool]:
    """`submit` for a job that runs on its own (the client polls it): its samples in flight
    are released when it finishes, or at once if it is not queued (an error, or a repeated
    idempotency key that names an earlier job)."""
    try:
        queued, created = await submit(state, job, fingerprint)
    except BaseException:
        await release(state, principal, job.id)
        raise
    if not created:
        await release(state, principal, job.id)
    elif principal.limits.max_samples_in_flight:
        task = asyncio.create_task(_release_when_done(state, principal, job.id))
        state.watchers.add(task)
        task.add_done_callback(state.watchers.discard)
    return queued, created


async def _release_when_done(state: ServiceState, principal: Principal, job_id: str) -> None:
    deadline = time.monotonic() + state.settings.result_ttl_s
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            if await state.queue.result(job_id, remaining) is not None:
                break
            if await state.queue.status(job_id) is None:  # forgotten or evicted
                break
        except QueueUnavailable:
            await asyncio.sleep(1.0)
    await release(state, principal, job_id)


async def run(
    state: ServiceState,
    job: Job,
    endpoint: str,
    dialect: Dialect = OPENAI,
    principal: Principal = ANONYMOUS,
) -> JobResult:
    """Submit a job, wait for its one result and return it if it succeeded; else raise
    the error its client sees. Counts the request in the metrics either way. The result
    is forgotten by the queue once in hand (nobody else asks for it) and the job's samples
    in flight are released."""
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
        state.queue.forget_soon(job.id)  # its cleanup does not hold up the response
        if result.state is not JobState.SUCCEEDED:
            raise failure(result, dialect)
    except FewstepError as exc:
        state.metrics.observe_request(
            job.model, job.sampler, endpoint, str(exc.status), None, principal.name
        )
        raise
    finally:
        await release(state, principal, job.id)
    seconds = time.perf_counter() - begin
    state.metrics.observe_request(job.model, job.sampler, endpoint, "200", seconds, principal.name)
    return result
