"""The embedded in-process queue: asyncio, one event loop, bounded by samples."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field

from service.errors import Conflict, QueueFull
from service.jobs import Job, JobEvent, JobResult, JobState, JobStatus
from service.queue.backlog import Backlog, WorkAhead, WorkRate


@dataclass
class _Entry:
    job: Job
    fingerprint: str
    key: tuple = ()  # heap order: (-priority, submit time, arrival number)
    state: JobState = JobState.QUEUED
    events: list[JobEvent] = field(default_factory=list)
    result: JobResult | None = None
    step: int = 0
    steps: int = 0
    left: int = 0  # row-steps still to run (the job's cost until its steps are reported)
    # any event (SSE): made when a reader first waits, so the steps of jobs nobody streams
    # (every synchronous request) arm no asyncio.Event
    changed: asyncio.Event | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)  # the result is stored

    def touch(self) -> None:
        """Wake everyone waiting on this entry; the next waiter arms a new event."""
        if self.changed is not None:
            self.changed.set()
            self.changed = None

    def waiter(self) -> asyncio.Event:
        """The event the next touch() sets (take it before reading the events)."""
        if self.changed is None:
            self.changed = asyncio.Event()
        return self.changed


def _size(result: JobResult) -> int:
    """Bytes a stored result holds (its outputs; the rest is small)."""
    return sum(len(o) for o in result.outputs)


class DrainRate:
    """Exponentially weighted samples-per-second completed, for Retry-After and ETAs."""

    def __init__(self, half_life: float = 10.0) -> None:
        self.half_life, self.rate, self.last = half_life, 0.0, time.monotonic()

    def add(self, samples: int) -> None:
        now = time.monotonic()
        dt = max(now - self.last, 1e-3)
        w = 0.5 ** (dt / self.half_life)
        self.rate = w * self.rate + (1 - w) * samples / dt
        self.last = now

    def seconds_for(self, samples: int) -> float | None:
        return samples / self.rate if self.rate > 0 else None


class MemoryQueue:
    """JobQueue in process memory; the default for `fewstep serve`."""

    def __init__(
        self,
        max_queued_samples: int = 1024,
        retained_jobs: int = 10000,
        retained_result_bytes: int = 256 * 2**20,
    ) -> None:
        self.max_queued_samples, self.retained_jobs = max_queued_samples, retained_jobs
        self.retained_result_bytes = retained_result_bytes
        self._result_bytes = 0  # outputs of the finished jobs still held
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._heap: list[tuple[int, float, int, str]] = []
        self._order = itertools.count()
        self._keys: dict[tuple[str, str], str] = {}  # (owner, idempotency key) -> job id
        self._queued_samples = 0
        self._queued_jobs = 0
        self._by_priority: Counter[int] = Counter()  # queued jobs per priority
        # per (model, version): row-steps admitted and unfinished per priority, those not
        # yet claimed, and their drain rate
        self._work: dict[tuple[str, int], Counter[int]] = {}
        self._queued_work: Counter[tuple[str, int]] = Counter()
        self._rates: dict[tuple[str, int], WorkRate] = {}
        self._seeds: dict[tuple[str, int], float] = {}  # the worker's engine speed
        self._wakeup = asyncio.Event()
        self.drain = DrainRate()
        self.heartbeat_s: float | None = None  # claims live as long as the process

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _retry_after(self, samples: int) -> float:
        eta = self.drain.seconds_for(samples)
        return 1.0 if eta is None else min(max(eta, 1.0), 60.0)

    async def submit(
        self, job: Job, fingerprint: str = "", max_ahead: float | None = None
    ) -> tuple[Job, bool]:
        scoped = (job.owner, job.idempotency_key)  # one principal's key is not another's
        if job.idempotency_key is not None and scoped in self._keys:
            first = self._entries.get(self._keys[scoped])
            if first is not None:
                if first.fingerprint != fingerprint:
                    raise Conflict(
                        "this Idempotency-Key was used with a different request; "
                        "use a new key for a new request",
                        param="Idempotency-Key",
                    )
                return first.job, False
        if max_ahead is not None:
            work = self._work.get((job.model, job.version), {})
            ahead = sum(w for p, w in work.items() if p >= job.priority and w > 0)
            if ahead > max_ahead:
                raise WorkAhead(ahead)
        excess = self._queued_samples + job.samples - self.max_queued_samples
        if excess > 0:
            raise QueueFull(
                f"the queue holds {self._queued_samples} samples "
                f"(limit {self.max_queued_samples}); "
                "retry after the Retry-After interval or lower n",
                retry_after=self._retry_after(excess),
            )
        entry = _Entry(job, fingerprint, (-job.priority, job.submit_time, next(self._order)))
        entry.left = job.cost
        self._entries[job.id] = entry
        if job.idempotency_key is not None:
            self._keys[scoped] = job.id
        heapq.heappush(self._heap, (*entry.key, job.id))
        self._queued_samples += job.samples
        self._queued_jobs += 1
        self._by_priority[job.priority] += 1
        self._work.setdefault((job.model, job.version), Counter())[job.priority] += job.cost
        self._queued_work[job.model, job.version] += job.cost
        # the newest job of its priority: everything queued at that priority or above is ahead
        position = sum(c for p, c in self._by_priority.items() if p >= job.priority) - 1
        self._add_event(entry, JobEvent(job.id, "queued", {"position": position}))
        self._wakeup.set()
        self._evict()
        return job, True

    def _evict(self, keep: str | None = None) -> None:
        """Forget the oldest finished jobs beyond `retained_jobs` or `retained_result_bytes`
        (oldest first, so the scan stops after a handful of entries); `keep` is the job
        that just finished, kept even if its result alone is over the byte bound."""
        excess = len(self._entries) - self.retained_jobs
        over = self._result_bytes - self.retained_result_bytes
        if excess <= 0 and over <= 0:
            return
        doomed = []
        for job_id, entry in self._entries.items():
            if excess <= 0 and over <= 0:
                break
            if entry.result is not None and job_id != keep:
                doomed.append(job_id)
                excess -= 1
                over -= _size(entry.result)
        for job_id in doomed:
            self._drop(job_id)

    def _drop(self, job_id: str) -> None:
        entry = self._entries.pop(job_id)
        if entry.result is not None:
            self._result_bytes -= _size(entry.result)
        if entry.job.idempotency_key is not None:
            self._keys.pop((entry.job.owner, entry.job.idempotency_key), None)

    async def forget(self, job_id: str) -> bool:
        entry = self._entries.get(job_id)
        if entry is None or entry.result is None:
            return False
        self._drop(job_id)
        return True

    def forget_soon(self, job_id: str) -> None:
        entry = self._entries.get(job_id)
        if entry is not None and entry.result is not None:
            self._drop(job_id)

    def _take_queued(self, entry: _Entry) -> None:
        self._queued_samples -= entry.job.samples
        self._queued_jobs -= 1
        self._by_priority[entry.job.priority] -= 1
        self._queued_work[entry.job.model, entry.job.version] -= entry.job.cost

    async def claim(
        self, max_samples: int, timeout: float, models: Collection[tuple[str, int]] | None = None
    ) -> list[Job]:
        deadline = time.monotonic() + timeout
        while not self._heap:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._wakeup.clear()
            try:  # asyncio.timeout, not wait_for: a submit wakes the worker in one hop
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return []
        claimed, skipped, budget = [], [], max_samples
        while self._heap and budget > 0:
            item = heapq.heappop(self._heap)
            entry = self._entries.get(item[3])
            if entry is None or entry.state is not JobState.QUEUED:
                continue
            if entry.job.samples > budget or (
                models is not None and (entry.job.model, entry.job.version) not in models
            ):
                skipped.append(item)
                continue
            budget -= entry.job.samples
            self._take_queued(entry)
            entry.state = JobState.RUNNING
            entry.touch()
            claimed.append(entry.job)
        for item in skipped:
            heapq.heappush(self._heap, item)
        return claimed

    async def complete_many(self, results: list[JobResult]) -> None:
        for result in results:
            await self.complete(result)

    async def complete(self, result: JobResult) -> None:
        entry = self._entries.get(result.job_id)
        if entry is None or entry.result is not None:
            return  # one result per job: a second completion is a duplicate
        if entry.state is JobState.QUEUED:
            self._take_queued(entry)
        self._work[entry.job.model, entry.job.version][entry.job.priority] -= entry.left
        entry.left = 0
        entry.state, entry.result = result.state, result
        self._result_bytes += _size(result)
        entry.done.set()
        if result.state is JobState.SUCCEEDED:
            self.drain.add(entry.job.samples)
            mv = (entry.job.model, entry.job.version)
            busy = self._queued_work[mv] > 0
            self._rates.setdefault(mv, WorkRate()).add(entry.job.cost, busy)
        data = (
            {"nfe": result.nfe} if result.state is JobState.SUCCEEDED else {"error": result.error}
        )
        self._add_event(entry, JobEvent(result.job_id, result.state.value, data))
        self._evict(keep=result.job_id)

    async def cancel(self, job_id: str) -> JobState | None:
        entry = self._entries.get(job_id)
        if entry is None:
            return None
        if entry.state is JobState.QUEUED:
            await self.complete(
                JobResult(job_id, JobState.CANCELED, error="canceled by the client")
            )
        elif entry.state is JobState.RUNNING:
            entry.state = JobState.CANCELED  # the worker sees it between steps
            entry.touch()
        return entry.state

    async def heartbeat(self, job_ids: Collection[str]) -> list[str]:
        return []  # one process: a claim cannot lapse

    async def is_canceled(self, job_id: str) -> bool:
        entry = self._entries.get(job_id)
        return entry is not None and entry.state is JobState.CANCELED and entry.result is None

    def _add_event(self, entry: _Entry, event: JobEvent) -> None:
        event.seq = len(entry.events) + 1
        entry.events.append(event)
        if event.type == "step":
            entry.step, entry.steps = event.data["step"], event.data["steps"]
            if entry.steps > 0:  # only the steps it has left still count as work ahead
                left = entry.job.cost * max(entry.steps - entry.step, 0) // entry.steps
                done, entry.left = entry.left - left, left
                self._work[entry.job.model, entry.job.version][entry.job.priority] -= done
        entry.touch()

    async def publish(self, event: JobEvent) -> None:
        entry = self._entries.get(event.job_id)
        if entry is not None and entry.result is None:
            self._add_event(entry, event)

    async def events(self, job_id: str, after: int = 0) -> AsyncIterator[JobEvent]:
        entry = self._entries.get(job_id)
        if entry is None:
            return
        seen = after
        while True:
            waiter = entry.waiter()
            for event in entry.events[seen:]:
                seen = event.seq
                yield event
                if event.terminal:
                    return
            if entry.events[-1].terminal:
                return  # finished, and the client has seen its end already
            await waiter.wait()

    async def result(self, job_id: str, timeout: float) -> JobResult | None:
        entry = self._entries.get(job_id)
        if entry is None:
            return None
        if entry.result is None and timeout > 0:
            # waits on `done` alone, so step events do not wake every waiting request
            # asyncio.timeout, not wait_for: no Task per request
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await entry.done.wait()
        return entry.result

    def _ahead(self, entry: _Entry) -> tuple[int, int]:
        """Queued jobs and samples that run before this one (a linear scan, no sort)."""
        jobs = samples = 0
        for item in self._heap:
            other = self._entries.get(item[3])
            if other is not None and other.state is JobState.QUEUED and other.key < entry.key:
                jobs += 1
                samples += other.job.samples
        return jobs, samples

    async def status(self, job_id: str) -> JobStatus | None:
        entry = self._entries.get(job_id)
        if entry is None:
            return None
        position = eta = None
        if entry.state is JobState.QUEUED:
            position, ahead = self._ahead(entry)
            eta = self.drain.seconds_for(ahead) if ahead else 0.0
        error = entry.result.error if entry.result else None
        return JobStatus(entry.job, entry.state, position, eta, entry.step, entry.steps, error)

    async def depth(self) -> tuple[int, int]:
        return self._queued_jobs, self._queued_samples

    async def backlog(self, model: str, version: int) -> Backlog:
        work = self._work.get((model, version), {})
        return Backlog({p: w for p, w in work.items() if w > 0}, self.drain_rate(model, version))

    def drain_rate(self, model: str, version: int) -> float | None:
        rate = self._rates.get((model, version))
        measured = rate.rate if rate is not None else None
        return measured if measured is not None else self._seeds.get((model, version))

    async def seed_rate(self, model: str, version: int, row_steps_per_s: float) -> None:
        self._seeds[model, version] = row_steps_per_s
