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

from engines.modalities import Modality
from engines.samplers import INFO
from service.config import Settings
from service.errors import DeadlineUnmeetable, Overloaded
from service.jobs import Job
from service.queue.backlog import Backlog
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


async def check(queue: JobQueue, settings: Settings, job: Job) -> float | None:
    """Admit or refuse a job by its predicted wait (see `judge`)."""
    backlog = await queue.backlog(job.model, job.version)
    return judge(backlog, job, target(settings, job.model, job.priority), time.time())
