"""The JobQueue protocol: what the API and the worker need from any queue backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from typing import Protocol

from service.jobs import Job, JobEvent, JobResult, JobState, JobStatus
from service.queue.backlog import Backlog


class JobQueue(Protocol):
    """Submit, claim, complete, cancel, events, results; the same for memory and Redis.

    A shared backend that does not answer raises QueueUnavailable (HTTP 503 + Retry-After)
    from any method; the caller may retry as it is."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def submit(
        self, job: Job, fingerprint: str = "", max_ahead: float | None = None
    ) -> tuple[Job, bool]:
        """Enqueue a job; returns (job, created). A repeated idempotency key returns the
        first job (created False), or raises Conflict if the request behind it differs.
        With `max_ahead`, raises WorkAhead and queues nothing when more row-steps than that
        are queued or running at the job's priority and above (the backlog admission
        reads, checked in the same step as the job is queued: service/capacity.py).
        Raises QueueFull (with retry_after) when the queue holds too many samples."""
        ...

    async def claim(
        self, max_samples: int, timeout: float, models: Collection[tuple[str, int]] | None = None
    ) -> list[Job]:
        """Take queued jobs (highest priority, then oldest) whose samples fit, waiting up
        to `timeout` seconds for the first; they become running. `models` ((name, version)
        pairs) limits the claim to what the caller has loaded; None takes any model. Each
        job's `delivery` says how many times it has been handed out (2+: its earlier
        holder died with it)."""
        ...

    heartbeat_s: float | None
    """How often a worker must call heartbeat() for the jobs it holds (None: never)."""

    async def heartbeat(self, job_ids: Collection[str]) -> list[str]:
        """Keep the claims on these running jobs alive; returns those the caller lost
        (its claim lapsed and another worker took the job over, which now finishes it)."""
        ...

    async def complete(self, result: JobResult) -> None:
        """Store the one result of a job (succeeded, failed or canceled) and wake waiters;
        a second result for the same job is ignored. The job leaves the queue only now."""
        ...

    async def complete_many(self, results: list[JobResult]) -> None:
        """complete() for each result, in order; a shared backend stores them in one round
        trip (the worker hands over every request a forward pass finished at once)."""
        ...

    async def cancel(self, job_id: str) -> JobState | None:
        """Cancel a queued or running job; returns its state after, None if unknown."""
        ...

    async def is_canceled(self, job_id: str) -> bool:
        """Whether the client canceled this running job (the worker asks between steps)."""
        ...

    async def publish(self, event: JobEvent) -> None:
        """Add a progress event; it may reach events() a moment later, always before the
        terminal one. Events after the result are dropped."""
        ...

    def events(self, job_id: str, after: int = 0) -> AsyncIterator[JobEvent]:
        """Every event after seq `after`, replayed then live, ending with a terminal one;
        ends at once for a finished job whose terminal event is at or before `after`."""
        ...

    async def result(self, job_id: str, timeout: float) -> JobResult | None:
        """The job's result, waiting up to `timeout` seconds; None if not done by then."""
        ...

    async def forget(self, job_id: str) -> bool:
        """Drop a finished job's record, events, result and idempotency key at once (a
        synchronous request calls it once it has delivered the result, so results are
        not kept for nobody); False if the job is unknown or not finished (kept)."""
        ...

    def forget_soon(self, job_id: str) -> None:
        """forget() without waiting for its answer: a shared backend sends the forgets of
        many requests together, moments later, so a synchronous request's response does
        not wait a round trip for its cleanup (one not sent, as when the process dies
        first, expires with the result TTL like any finished job)."""
        ...

    async def status(self, job_id: str) -> JobStatus | None: ...

    async def depth(self) -> tuple[int, int]:
        """(queued jobs, queued samples)."""
        ...

    async def backlog(self, model: str, version: int) -> Backlog:
        """The model version's queued row-steps by priority and their measured drain rate
        (what admission predicts a new job's wait from); until the rate has been measured,
        the rate a worker announced with `seed_rate`."""
        ...

    def drain_rate(self, model: str, version: int) -> float | None:
        """The drain rate `backlog` would report, where this process knows it without
        asking the backend (row-steps per second); None otherwise."""
        ...

    async def seed_rate(self, model: str, version: int, row_steps_per_s: float) -> None:
        """A worker's measured engine speed for a model version (row-steps per second at
        its largest batch): what `backlog` reports until a drain rate has been measured."""
        ...
