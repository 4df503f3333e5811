"""Admission by predicted wait: refuse at once, with an accurate Retry-After, a request the
queue cannot start in time, instead of queueing it without bound.

A job's cost is its row-steps (rows per forward pass x network evaluations, from its
modality and sampler). Each queue backend keeps the row-steps admitted and unfinished
(queued or running) per model version and priority, and measures how fast its workers
drain them while work waits (backlog.py). A new job waits for that work at its priority
or above: wait = ahead / rate. It is
refused (429) when that exceeds the model's target for its priority (`Overloaded`), or
when it exceeds the time left to its own deadline (`DeadlineUnmeetable`). Until a model's
drain rate has been measured (its queue has not yet had work waiting), the rate is the
engine speed its worker timed and announced at start (JobQueue.seed_rate); with neither,
nothing is refused here and the queued-samples bound is the guard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from engines.modalities import Modality
from engines.samplers import INFO
from service.config import Settings
from service.errors import DeadlineUnmeetable, Overloaded
from service.jobs import Job
from service.queue.backlog import Backlog, WorkAhead
from service.queue.base import JobQueue


def cost(modality: Modality, spec, inputs, n: int, sampler: str, steps: int) -> int:
    """Row-steps of a request: rows x steps from its modality, x evaluations per step."""
    return modality.cost(spec, inputs, n, steps).row_steps * INFO[sampler].evals_per_step


def target(settings: Settings, model: str, priority: int) -> float:
    """Seconds a job of this model and priority may be predicted to wait."""
    targets = settings.max_predicted_wait
    for key in (f"{model}:{priority}", model, f":{priority}"):
        if key in targets:
            return targets[key]
    return settings.max_predicted_wait_s


def predicted_wait(backlog: Backlog, priority: int) -> float | None:
    """Seconds until a new job of this priority starts; None while the rate is unknown."""
    if backlog.rate is None:
        return None
    return backlog.ahead(priority) / backlog.rate


def judge(backlog: Backlog, job: Job, target_s: float, now: float) -> float | None:
    """The job's predicted wait, or the refusal it gets (Retry-After: when the backlog,
    draining at the measured rate, would have shrunk enough to admit it)."""
    wait = predicted_wait(backlog, job.priority)
    if wait is None:
        return None
    if job.deadline is not None and wait > job.deadline - now:
        left = job.deadline - now
        raise DeadlineUnmeetable(
            f"the work ahead of this request takes about {wait:.2f} s, longer than "
            f"its deadline allows ({max(left, 0) * 1000:.0f} ms); raise the deadline, "
            "lower the priority of other work, or retry after the Retry-After interval",
            retry_after=wait - max(left, 0),
        )
    if wait > target_s:
        raise Overloaded(
            f"model {job.model} is overloaded: this request would wait about {wait:.2f} s "
            f"(target {target_s:g} s); retry after the Retry-After interval",
            retry_after=wait - target_s,
        )
    return wait


def own_seconds(backlog: Backlog, job: Job, steps: int, batch_rows: int) -> float:
    """Predicted seconds the job computes once it starts, at `steps`: one forward pass per
    step, and a pass carries the job's rows and as many of the rows ahead as fit in the
    model's batch (the rows ahead are about the work ahead over the job's steps); a pass of
    r rows costs r / rate at the measured row-steps per second."""
    rows = max(1, job.cost // max(job.steps, 1) // max(_evals(job), 1))
    ahead_rows = backlog.ahead(job.priority) / max(steps, 1)
    pass_rows = min(max(batch_rows, rows), rows + ahead_rows)
    return steps * _evals(job) * pass_rows / backlog.rate


def _evals(job: Job) -> int:
    return INFO[job.sampler].evals_per_step


def choose_steps(
    backlog: Backlog, job: Job, now: float, batch_rows: int, graded: bool = True
) -> int:
    """Quality "auto": the most steps of `job.step_budgets` (largest first) whose predicted
    finish, the wait for the work ahead plus its own compute at that many steps, meets the
    job's deadline at the current load.

    Greedy, that alone lets the queue grow until waits reach the deadline (the steps left
    do not change the wait, only the work each request adds), then refuses: every request
    is admitted at full steps while it fits. Graded (the default) keeps headroom: the i-th
    of m budgets (i = 0 the largest) must finish within (i + 1) / m of the time left, so
    requests fall to fewer steps as soon as the queue grows, which cuts the work arriving
    before the queue reaches the deadline. Before the drain rate is known nothing can be
    predicted: the largest. DeadlineUnmeetable when not even the fewest steps fit."""
    wait = predicted_wait(backlog, job.priority)
    if wait is None:
        return job.step_budgets[0]
    left = job.deadline - now
    budgets = job.step_budgets
    for i, steps in enumerate(budgets):
        share = (i + 1) / len(budgets) if graded else 1.0
        if wait + own_seconds(backlog, job, steps, batch_rows) <= left * share:
            return steps
    fewest = budgets[-1]
    finish = wait + own_seconds(backlog, job, fewest, batch_rows)
    raise DeadlineUnmeetable(
        f"even at {fewest} step{'s' if fewest > 1 else ''} this request would finish in about "
        f"{finish:.2f} s, after its deadline ({max(left, 0) * 1000:.0f} ms) at the current "
        "load; raise the deadline or retry after the Retry-After interval",
        retry_after=finish - max(left, 0),
    )


async def check(queue: JobQueue, settings: Settings, job: Job, batch_rows: int = 1) -> float | None:
    """Admit or refuse a job by its predicted wait (see `judge`). A quality "auto" job
    (step_budgets) is admitted at the most steps that meet its deadline instead: its
    steps and cost are set here (see `choose_steps`); `batch_rows` is its model's
    max_batch_size."""
    backlog = await queue.backlog(job.model, job.version)
    now = time.time()
    if job.step_budgets:
        graded = settings.auto_quality == "graded"
        steps = choose_steps(backlog, job, now, batch_rows, graded)
        job.cost = job.cost // job.steps * steps  # row-steps are linear in steps
        job.steps = steps
        return predicted_wait(backlog, job.priority)
    return judge(backlog, job, target(settings, job.model, job.priority), now)


@dataclass(frozen=True)
class Limit:
    """What a plain job may have ahead of it, for the queue to check as it queues the job."""

    rate: float  # the drain rate the bound was made from, row-steps per second
    target_s: float  # the model's target wait for the job's priority
    now: float
    work: float  # row-steps ahead allowed: rate x (the target, or the time to the deadline)


def limit(queue: JobQueue, settings: Settings, job: Job) -> Limit | None:
    """The bound `judge` would apply to a plain job, as row-steps ahead (`submit_within`).

    None for a quality "auto" job (its steps depend on the backlog: `check` reads it) and
    while this process does not know the model's drain rate without asking the backend."""
    if job.step_budgets:
        return None
    rate = queue.drain_rate(job.model, job.version)
    if rate is None:
        return None
    now = time.time()
    target_s = target(settings, job.model, job.priority)
    allowed = target_s if job.deadline is None else min(target_s, job.deadline - now)
    return Limit(rate, target_s, now, rate * allowed)


async def submit_within(
    queue: JobQueue, settings: Settings, job: Job, fingerprint: str = "", batch_rows: int = 1
) -> tuple[Job, bool]:
    """Queue the job if its predicted wait is within bounds, else refuse it (`judge`).

    Where the drain rate is known here (`limit`), the queue compares the work ahead with
    the bound in the same step as it queues the job: on Redis one round trip instead of a
    backlog read and then the submit, and no other API's job slips in between the two.
    Otherwise `check` reads the backlog first. Raises what `judge`, `choose_steps` and
    JobQueue.submit raise."""
    bound = limit(queue, settings, job)
    if bound is None:
        await check(queue, settings, job, batch_rows)
        return await queue.submit(job, fingerprint)
    try:
        return await queue.submit(job, fingerprint, max_ahead=bound.work)
    except WorkAhead as busy:
        judge(Backlog({job.priority: busy.ahead}, bound.rate), job, bound.target_s, bound.now)
    # within a rounding error of the bound: judge admits it
    return await queue.submit(job, fingerprint)
