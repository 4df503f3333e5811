"""Admission by predicted wait (service/capacity.py): the drain rate counts only busy time,
both queue backends keep the queued row-steps per priority, the predictor refuses what
would wait too long (with a Retry-After that admits the retry) and what cannot start
before its own deadline, and a real server answers 429 for both without computing."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from service import capacity
from service.config import Settings
from service.errors import DeadlineUnmeetable, Overloaded
from service.jobs import JobEvent, JobResult, JobState
from service.queue.backlog import Backlog, WorkAhead, WorkRate

from .conftest import serve
from .test_queue import job, make, run  # noqa: F401 (make is the two-backend fixture)


def costly(cost: int, priority: int = 0, t: float = 0.0, deadline: float | None = None):
    j = job(priority=priority, t=t)
    j.cost, j.deadline = cost, deadline
    return j


def test_work_rate_counts_busy_intervals_only():
    rate = WorkRate(half_life=100.0)
    rate.add(50, busy=False, now=0.0)  # idle: the time until the next completion is ignored
    rate.add(50, busy=True, now=10.0)  # starts a busy period; its own work has no interval
    assert rate.rate is None
    rate.add(100, busy=True, now=10.5)
    rate.add(100, busy=False, now=11.0)  # the queue ran dry: this interval still counts
    assert rate.rate == pytest.approx(200 / 1.0, rel=0.02)
    rate.add(100, busy=True, now=60.0)  # after an idle stretch: no interval
    assert rate.rate == pytest.approx(200, rel=0.02)


def test_a_batch_completing_at_once_is_not_a_spike():
    rate = WorkRate()
    rate.add(10, busy=True, now=0.0)
    for _ in range(8):  # one forward pass finishes eight jobs
        rate.add(10, busy=True, now=0.1)
    assert rate.rate == pytest.approx(800, rel=0.01)


def test_predictor_admits_within_the_target_and_refuses_beyond_it():
    backlog = Backlog({0: 300, 1: 100}, rate=100.0)
    assert capacity.judge(backlog, costly(10), 5.0, now=0.0) == pytest.approx(4.0)
    # a higher priority waits only for its own level and above
    assert capacity.judge(backlog, costly(10, priority=1), 1.5, now=0.0) == pytest.approx(1.0)
    with pytest.raises(Overloaded) as info:
        capacity.judge(backlog, costly(10), 1.5, now=0.0)
    err = info.value
    assert err.status == 429 and err.reason == "predicted_wait"
    # Retry-After: once the backlog has drained for that long, the same job is admitted
    assert err.retry_after == pytest.approx(4.0 - 1.5)
    drained = Backlog({0: 300 - 100 * err.retry_after, 1: 100}, rate=100.0)
    assert capacity.judge(drained, costly(10), 1.5, now=0.0) == pytest.approx(1.5)
    assert err.headers() == {"Retry-After": "3"}


def test_no_rate_measured_no_refusal():
    assert capacity.judge(Backlog({0: 10**9}, rate=None), costly(10), 0.1, now=0.0) is None


def test_a_deadline_the_queue_cannot_meet_is_refused_at_once():
    backlog = Backlog({0: 200}, rate=100.0)  # 2 s of work ahead
    with pytest.raises(DeadlineUnmeetable) as info:
        capacity.judge(backlog, costly(10, deadline=100.5), 60.0, now=100.0)
    assert info.value.status == 429 and info.value.reason == "deadline_unmeetable"
    assert info.value.retry_after == pytest.approx(1.5)
    assert capacity.judge(backlog, costly(10, deadline=103.0), 60.0, now=100.0) == 2.0


def test_targets_per_model_and_priority():
    s = Settings(
        max_predicted_wait_s=2.0,
        max_predicted_wait={"toy:1": 9.0, "toy": 1.0, ":1": 5.0},
    )
    assert capacity.target(s, "toy", 1) == 9.0
    assert capacity.target(s, "toy", 0) == 1.0
    assert capacity.target(s, "other", 1) == 5.0
    assert capacity.target(s, "other", 0) == 2.0


def test_queues_count_unfinished_row_steps_per_priority(make):  # noqa: F811
    async def scenario(queue):
        a, b, c = costly(40, t=1), costly(60, t=2), costly(5, priority=2, t=3)
        for j in (a, b, c):
            await queue.submit(j)
        full = await queue.backlog("toy", 1)
        await queue.claim(1, 0)  # c, the highest priority: running, still to finish
        await queue.cancel(b.id)
        running = await queue.backlog("toy", 1)
        await queue.complete(JobResult(c.id, JobState.SUCCEEDED))
        done = await queue.backlog("toy", 1)
        other = await queue.backlog("other", 1)
        return full, running, done, other

    full, running, done, other = run(scenario, make(100))
    assert full.work == {0: 100, 2: 5} and full.ahead(0) == 105 and full.ahead(1) == 5
    assert running.work == {0: 40, 2: 5}
    assert done.work == {0: 40}
    assert other.work == {} and other.rate is None


def test_a_running_jobs_reported_steps_leave_the_work_ahead(make):  # noqa: F811
    async def scenario(queue):
        a = costly(40)
        await queue.submit(a)
        await queue.claim(1, 0)
        await queue.publish(JobEvent(a.id, "step", {"step": 3, "steps": 4}))
        await asyncio.sleep(0.05)
        left = await queue.backlog("toy", 1)
        await queue.complete(JobResult(a.id, JobState.SUCCEEDED))
        return left, await queue.backlog("toy", 1)

    left, done = run(scenario, make(100))
    assert left.work == {0: 10} and done.work == {}


def test_a_canceled_running_jobs_steps_count_until_its_result(make):  # noqa: F811
    """A running job the client canceled still runs to its next step: that step's event is
    recorded and its progress counted; once its result is stored, later steps are not."""

    async def scenario(queue):
        a = costly(40)
        await queue.submit(a)
        await queue.claim(1, 0)
        await queue.cancel(a.id)
        await queue.publish(JobEvent(a.id, "step", {"step": 1, "steps": 4}))
        await asyncio.sleep(0.05)
        left = await queue.backlog("toy", 1)
        await queue.complete(JobResult(a.id, JobState.CANCELED, error="canceled"))
        await queue.publish(JobEvent(a.id, "step", {"step": 2, "steps": 4}))
        await asyncio.sleep(0.05)
        types = [e.type async for e in queue.events(a.id)]
        return left, types, (await queue.status(a.id)).step, await queue.backlog("toy", 1)

    left, types, step, done = run(scenario, make(100))
    assert left.work == {0: 30} and done.work == {}
    assert types == ["queued", "step", "canceled"] and step == 1


def test_queues_measure_the_drain_rate_while_work_waits(make):  # noqa: F811
    async def scenario(queue):
        await queue.backlog("toy", 1)  # an API process starts listening for completions
        jobs = [costly(30, t=i) for i in range(4)]
        for j in jobs:
            await queue.submit(j)
        for _ in range(3):  # each completes 0.2 s after the last, with work still queued
            (claimed,) = await queue.claim(1, 0)
            await asyncio.sleep(0.2)
            await queue.complete(JobResult(claimed.id, JobState.SUCCEEDED))
        for _ in range(40):  # Redis: completions reach the API over pub/sub
            backlog = await queue.backlog("toy", 1)
            if backlog.rate is not None:
                break
            await asyncio.sleep(0.05)
        return backlog

    backlog = run(scenario, make(100))
    assert backlog.work == {0: 30}  # the one job left
    assert backlog.rate == pytest.approx(30 / 0.2, rel=0.35)


def test_a_workers_engine_speed_stands_in_until_a_rate_is_measured(make):  # noqa: F811
    async def scenario(queue):
        await queue.backlog("toy", 1)  # an API process starts listening for completions
        await queue.seed_rate("toy", 1, 1000.0)
        jobs = [costly(30, t=i) for i in range(4)]
        for j in jobs:
            await queue.submit(j)
        seeded = await queue.backlog("toy", 1)
        for _ in range(3):
            (claimed,) = await queue.claim(1, 0)
            await asyncio.sleep(0.2)
            await queue.complete(JobResult(claimed.id, JobState.SUCCEEDED))
        for _ in range(40):
            measured = await queue.backlog("toy", 1)
            if measured.rate != 1000.0:
                break
            await asyncio.sleep(0.05)
        return seeded, measured, await queue.backlog("other", 1)

    seeded, measured, other = run(scenario, make(100))
    assert seeded.rate == 1000.0 and seeded.work == {0: 120}
    # with a seed the first request is already judged: 120 row-steps ahead = 0.12 s
    assert capacity.predicted_wait(seeded, 0) == pytest.approx(0.12)
    assert measured.rate == pytest.approx(30 / 0.2, rel=0.35)  # the measurement wins
    assert other.rate is None  # a seed is per model version


def test_a_workers_announced_speed_is_known_in_process_once_read(make, monkeypatch):  # noqa: F811
    """Before any rate is measured, drain_rate gives the speed a worker announced (on
    Redis: as the last backlog read found it, for SEED_TTL_S, then it is read again), so a
    lightly loaded API checks the bound in its submit too."""
    from service.queue import redis_streams

    async def scenario(queue):
        before = queue.drain_rate("toy", 1)
        await queue.seed_rate("toy", 1, 1000.0)
        await queue.backlog("toy", 1)
        known = queue.drain_rate("toy", 1)
        monkeypatch.setattr(redis_streams, "SEED_TTL_S", 0.0)
        return before, known, queue.drain_rate("toy", 1)

    queue = make(100)
    before, known, later = run(scenario, queue)
    assert before is None and known == 1000.0
    assert later == (None if isinstance(queue, redis_streams.RedisStreamsQueue) else 1000.0)


def test_submit_checks_the_work_ahead_as_it_queues(make):  # noqa: F811
    """max_ahead: more row-steps than that at the job's priority and above and the queue
    refuses (WorkAhead, with the work it saw) without queueing; lower priorities do not
    count; a retried idempotency key gets its job back whatever the work ahead."""

    async def scenario(queue):
        await queue.submit(costly(100, t=1))
        await queue.submit(costly(30, priority=1, t=2))
        refused = []
        for j, bound in ((costly(10, t=3), 129), (costly(10, priority=1, t=4), 29)):
            try:
                await queue.submit(j, max_ahead=bound)
            except WorkAhead as busy:
                refused.append(busy.ahead)
        after = await queue.backlog("toy", 1)
        fits = costly(10, t=5)
        fits.idempotency_key = "k"
        _, created = await queue.submit(fits, "fp", max_ahead=130)  # exactly the bound
        again = costly(10, t=6)
        again.idempotency_key = "k"
        first, created_again = await queue.submit(again, "fp", max_ahead=0)
        high = costly(10, priority=2, t=7)
        await queue.submit(high, max_ahead=0)  # nothing at priority 2 or above
        return refused, after, created, first.id == fits.id, created_again

    refused, after, created, same, created_again = run(scenario, make(1000))
    assert refused == [130, 30] and after.work == {0: 100, 1: 30}  # nothing was queued
    assert created and same and not created_again


def test_submit_within_refuses_as_judge_does(make):  # noqa: F811
    """With a drain rate known in the process, the bound goes with the submit: a job over
    the target gets Overloaded with judge's Retry-After, one that cannot start before its
    deadline DeadlineUnmeetable, others are queued; nothing refused is queued."""

    async def scenario(queue):
        await queue.submit(costly(300, t=1))
        queue.drain_rate = lambda model, version: 100.0  # as measured: 3 s of work ahead
        short, long = Settings(max_predicted_wait_s=1.0), Settings(max_predicted_wait_s=5.0)
        now = time.time()
        outcomes = []
        for settings, j in (
            (short, costly(10, t=2)),
            (long, costly(10, t=3, deadline=now + 0.5)),
            (short, costly(10, priority=1, t=4)),  # nothing ahead at priority 1
            (long, costly(10, t=5)),
        ):
            try:
                _, created = await capacity.submit_within(queue, settings, j)
                outcomes.append(created)
            except (Overloaded, DeadlineUnmeetable) as err:
                outcomes.append((err.reason, round(err.retry_after, 1)))
        return outcomes, await queue.backlog("toy", 1)

    outcomes, backlog = run(scenario, make(1000))
    assert outcomes == [("predicted_wait", 2.0), ("deadline_unmeetable", 2.5), True, True]
    assert backlog.work == {0: 310, 1: 10}


def refuses_by_predicted_wait_and_unmeetable_deadline(url: str) -> None:
    """slow-model: 0.05 s per forward of up to 64 rows; n=2 x 20 steps = 40 row-steps a job,
    so about 1280 row-steps/s drain and a 0.3 s target holds about 10 jobs ahead."""
    body = {"model": "slow-model", "prompt": "dark", "n": 2, "steps": 20}
    with httpx.Client(base_url=url, timeout=30) as c:
        refused, accepted, end = None, 0, time.monotonic() + 20
        while refused is None and time.monotonic() < end:
            r = c.post("/v1/jobs", json=body)
            if r.status_code == 429:
                refused = r
            else:
                assert r.status_code == 202, r.text
                accepted += 1
                time.sleep(0.005)
        assert refused is not None, "never refused"
        err = refused.json()["error"]
        assert err["code"] == "predicted_wait" and "would wait about" in err["message"]
        assert int(refused.headers["retry-after"]) >= 1
        # refused long before the samples bound (1000 jobs) would: the first ~1.5 s of
        # submissions land before any job finishes, so before the rate is measured
        assert accepted < 400

        before = c.get("/metrics").text
        begin = time.perf_counter()
        r = c.post("/v1/images/generations", json={**body, "deadline_ms": 20})
        assert time.perf_counter() - begin < 1.0  # answered at once, not after the deadline
        assert r.status_code == 429 and r.json()["error"]["code"] == "deadline_unmeetable"
        metrics = c.get("/metrics").text
        assert 'fewstep_rejected_total{principal="anonymous",reason="predicted_wait"}' in metrics
        unmeetable = 'fewstep_rejected_total{principal="anonymous",reason="deadline_unmeetable"}'
        assert f"{unmeetable} 1.0" in metrics
        assert "deadline_unmeetable" not in before


def test_server_refuses_by_predicted_wait_and_unmeetable_deadline():
    with serve(max_predicted_wait_s=0.3, max_queued_samples=2000) as server:
        refuses_by_predicted_wait_and_unmeetable_deadline(server.url)
