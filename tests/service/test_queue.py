"""The JobQueue contract, run against the in-process backend (Redis joins with issue 5)."""

from __future__ import annotations

import asyncio

import pytest

from service.errors import Conflict, QueueFull
from service.jobs import Job, JobEvent, JobResult, JobState
from service.queue.memory import MemoryQueue


def job(n=1, priority=0, key=None, seed=0, t=0.0) -> Job:
    return Job(
        "toy",
        1,
        [0] * n,
        n,
        "euler",
        2,
        seed,
        priority=priority,
        idempotency_key=key,
        submit_time=t,
    )


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def queue():
    return MemoryQueue(max_queued_samples=10, retained_jobs=50)


def test_claim_takes_priority_then_age_within_the_sample_budget():
    queue = MemoryQueue(max_queued_samples=100)

    async def scenario():
        a, b, c, d = job(3, t=1), job(3, t=2), job(2, priority=5, t=3), job(5, t=0.5)
        for j in (a, b, c, d):
            await queue.submit(j)
        first = await queue.claim(6, 0)
        second = await queue.claim(10, 0)
        return [j.id for j in first], [j.id for j in second], (a, b, c, d)

    first, second, (a, b, c, d) = run(scenario())
    # c (priority 5) first; d is older than a but does not fit the 4 samples left
    assert first == [c.id, a.id]
    assert second == [d.id, b.id]


def test_claim_waits_for_a_job_then_gives_up(queue):
    async def scenario():
        empty = await queue.claim(4, 0.05)
        later = job()

        async def submit_soon():
            await asyncio.sleep(0.02)
            await queue.submit(later)

        task = asyncio.create_task(submit_soon())
        got = await queue.claim(4, 2.0)
        await task
        return empty, got, later

    empty, got, later = run(scenario())
    assert empty == [] and [j.id for j in got] == [later.id]


def test_admission_bound_in_samples_with_retry_after(queue):
    async def scenario():
        await queue.submit(job(8))
        with pytest.raises(QueueFull) as info:
            await queue.submit(job(3))
        await queue.submit(job(2))  # still fits
        return info.value

    err = run(scenario())
    assert err.status == 429 and err.retry_after >= 1 and "limit 10" in err.message


def test_idempotency_key_dedupes_and_detects_a_different_body(queue):
    async def scenario():
        first, created = await queue.submit(job(key="k"), "body-a")
        again, created_again = await queue.submit(job(key="k"), "body-a")
        with pytest.raises(Conflict):
            await queue.submit(job(key="k"), "body-b")
        return first, created, again, created_again

    first, created, again, created_again = run(scenario())
    assert created and not created_again and again.id == first.id


def test_position_and_eta(queue):
    async def scenario():
        jobs = [job(2, t=i) for i in range(3)]
        for j in jobs:
            await queue.submit(j)
        urgent = job(1, priority=3, t=9)
        await queue.submit(urgent)
        statuses = [await queue.status(j.id) for j in [*jobs, urgent]]
        events = [e async for e in _take(queue.events(urgent.id), 1)]
        return statuses, events

    statuses, events = run(scenario())
    assert [s.position for s in statuses] == [1, 2, 3, 0]
    assert statuses[3].estimated_start_seconds == 0.0
    assert events[0].type == "queued" and events[0].data["position"] == 0


async def _take(aiter, count):
    out = []
    async for item in aiter:
        out.append(item)
        if len(out) == count:
            break
    for item in out:
        yield item


def test_cancel_queued_and_running(queue):
    async def scenario():
        waiting, running = job(t=2), job(t=1)
        await queue.submit(waiting)
        await queue.submit(running)
        (claimed,) = await queue.claim(1, 0)
        assert claimed.id == running.id
        assert await queue.cancel(waiting.id) is JobState.CANCELED
        assert (await queue.result(waiting.id, 0)).state is JobState.CANCELED
        assert await queue.cancel(running.id) is JobState.CANCELED
        assert await queue.is_canceled(running.id)  # the worker sees it between steps
        await queue.complete(JobResult(running.id, JobState.CANCELED, error="canceled"))
        assert not await queue.is_canceled(running.id)
        assert await queue.cancel("job_nope") is None
        return await queue.depth()

    assert run(scenario()) == (0, 0)


def test_one_result_per_job_and_events_replay(queue):
    async def scenario():
        j = job()
        await queue.submit(j)
        await queue.claim(1, 0)
        await queue.publish(JobEvent(j.id, "step", {"step": 1, "steps": 2}))
        await queue.complete(JobResult(j.id, JobState.SUCCEEDED, outputs=[b"png"], nfe=2))
        await queue.complete(JobResult(j.id, JobState.FAILED, error="duplicate"))
        await queue.publish(JobEvent(j.id, "step", {"step": 2, "steps": 2}))  # too late: dropped
        events = [e async for e in queue.events(j.id)]
        resumed = [e async for e in queue.events(j.id, after=2)]
        return (await queue.result(j.id, 0)), events, resumed, await queue.status(j.id)

    result, events, resumed, status = run(scenario())
    assert result.state is JobState.SUCCEEDED and result.outputs == [b"png"]
    assert [e.type for e in events] == ["queued", "step", "succeeded"]
    assert [e.seq for e in events] == [1, 2, 3] and [e.type for e in resumed] == ["succeeded"]
    assert status.step == 1 and status.position is None


def test_result_waits_and_times_out(queue):
    async def scenario():
        j = job()
        await queue.submit(j)
        missing = await queue.result(j.id, 0.05)

        async def finish_soon():
            await asyncio.sleep(0.02)
            await queue.complete(JobResult(j.id, JobState.SUCCEEDED))

        task = asyncio.create_task(finish_soon())
        done = await queue.result(j.id, 2.0)
        await task
        return missing, done

    missing, done = run(scenario())
    assert missing is None and done.state is JobState.SUCCEEDED


def test_finished_jobs_beyond_retention_are_forgotten():
    async def scenario():
        q = MemoryQueue(max_queued_samples=100, retained_jobs=3)
        jobs = [job(key=f"k{i}") for i in range(5)]
        for j in jobs[:4]:
            await q.submit(j)
            await q.claim(1, 0)
            await q.complete(JobResult(j.id, JobState.SUCCEEDED))
        await q.submit(jobs[4])
        return q, jobs

    q, jobs = run(scenario())
    assert run(q.status(jobs[0].id)) is None and run(q.status(jobs[1].id)) is None
    assert run(q.status(jobs[4].id)).state is JobState.QUEUED
