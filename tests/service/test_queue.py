"""The JobQueue contract, run unchanged against the in-process and the Redis Streams backend
(the real Redis at 127.0.0.1:6379, a fresh key prefix per test, deleted afterwards), then
what each backend adds: memory's retention, Redis's recovery, dead letters, heartbeats and
cross-process notification."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest
import redis

from engines.modalities import ImageInputs
from service.errors import Conflict, QueueFull, QueueUnavailable
from service.jobs import Job, JobEvent, JobResult, JobState
from service.queue.keys import GROUP, Keys, lua_prelude
from service.queue.memory import MemoryQueue
from service.queue.redis_streams import RedisStreamsQueue

from .redisutil import REDIS_URL, delete_prefix, free_port, new_prefix, require_redis


def job(n=1, priority=0, key=None, seed=0, t=0.0, model="toy", owner="") -> Job:
    return Job(
        model,
        1,
        ImageInputs([0] * n),
        n,
        "euler",
        2,
        seed,
        priority=priority,
        idempotency_key=key,
        submit_time=t,
        owner=owner,
    )


def run(scenario, *queues):
    """Start the queues, run scenario(*queues) on one event loop, close them."""

    async def main():
        for q in queues:
            await q.start()
        try:
            return await scenario(*queues)
        finally:
            for q in queues:
                await q.close()

    return asyncio.run(main())


@pytest.fixture(params=["memory", "redis"])
def make(request):
    """make(max_queued_samples=10) -> a queue of the backend under test, not started."""
    if request.param == "memory":
        yield lambda max_queued_samples=10: MemoryQueue(max_queued_samples, retained_jobs=50)
        return
    require_redis()
    prefix = new_prefix()
    yield lambda max_queued_samples=10: RedisStreamsQueue(
        REDIS_URL, prefix=prefix, max_queued_samples=max_queued_samples
    )
    delete_prefix(prefix)


# -- the contract ---------------------------------------------------------------------------


def test_claim_takes_priority_then_age_within_the_sample_budget(make):
    async def scenario(queue):
        a, b, c = job(3, t=1), job(3, t=2), job(2, priority=5, t=3)
        for j in (a, b, c):
            await queue.submit(j)
        first = await queue.claim(6, 0)
        second = await queue.claim(10, 0)
        return [j.id for j in first], [j.id for j in second], (a, b, c)

    first, second, (a, b, c) = run(scenario, make(100))
    # c (priority 5) first, then the oldest; b does not fit the one sample left
    assert first == [c.id, a.id]
    assert second == [b.id]


def test_claim_waits_for_a_job_then_gives_up(make):
    async def scenario(queue):
        empty = await queue.claim(4, 0.05)
        later = job()

        async def submit_soon():
            await asyncio.sleep(0.02)
            await queue.submit(later)

        task = asyncio.create_task(submit_soon())
        begin = time.perf_counter()
        got = await queue.claim(4, 2.0)
        waited = time.perf_counter() - begin
        await task
        return empty, got, later, waited

    empty, got, later, waited = run(scenario, make())
    assert empty == [] and [j.id for j in got] == [later.id]
    assert waited < 1.0  # woken by the submission, not by the timeout
    assert got[0].delivery == 1


def test_claim_only_the_models_asked_for(make):
    async def scenario(queue):
        other, mine = job(model="other", t=1), job(t=2)
        await queue.submit(other)
        await queue.submit(mine)
        got = await queue.claim(10, 0, [("toy", 1)])
        rest = await queue.claim(10, 0)
        return [j.id for j in got], [j.id for j in rest], other, mine

    got, rest, other, mine = run(scenario, make())
    assert got == [mine.id] and rest == [other.id]


def test_admission_bound_in_samples_with_retry_after(make):
    async def scenario(queue):
        await queue.submit(job(8))
        with pytest.raises(QueueFull) as info:
            await queue.submit(job(3))
        await queue.submit(job(2))  # still fits
        return info.value, await queue.depth()

    err, depth = run(scenario, make())
    assert err.status == 429 and err.retry_after >= 1 and "limit 10" in err.message
    assert depth == (2, 10)


def test_idempotency_key_dedupes_and_detects_a_different_body(make):
    async def scenario(queue):
        first, created = await queue.submit(job(key="k"), "body-a")
        again, created_again = await queue.submit(job(key="k"), "body-a")
        with pytest.raises(Conflict):
            await queue.submit(job(key="k"), "body-b")
        return first, created, again, created_again, await queue.depth()

    first, created, again, created_again, depth = run(scenario, make())
    assert created and not created_again and again.id == first.id
    assert depth == (1, 1)


def test_idempotency_keys_are_scoped_per_owner(make):
    async def scenario(queue):
        alice, created_a = await queue.submit(job(key="k", owner="alice"), "body-a")
        bob, created_b = await queue.submit(job(key="k", owner="bob"), "body-b")  # no Conflict
        again, created_again = await queue.submit(job(key="k", owner="bob"), "body-b")
        return alice, bob, again, (created_a, created_b, created_again), await queue.status(bob.id)

    alice, bob, again, created, status = run(scenario, make())
    assert alice.id != bob.id and again.id == bob.id and created == (True, True, False)
    assert status.job.owner == "bob"  # the owner travels with the job


def test_events_of_a_finished_job_end_at_once_past_their_end(make):
    async def scenario(queue):
        j = job()
        await queue.submit(j)
        await queue.claim(1, 0)
        await queue.complete(JobResult(j.id, JobState.SUCCEEDED, nfe=2))
        begin = time.perf_counter()
        at_end = await asyncio.wait_for(_all(queue.events(j.id, after=2)), 5)
        past = await asyncio.wait_for(_all(queue.events(j.id, after=10**9)), 5)
        return at_end, past, time.perf_counter() - begin

    at_end, past, took = run(scenario, make())
    assert at_end == [] and past == [] and took < 1.0


async def _all(aiter) -> list:
    return [item async for item in aiter]


def test_forget_soon_drops_finished_jobs_together_and_keeps_unfinished_ones(make):
    """What a synchronous request does after its response: the forgets go out moments
    later (Redis: in one pipeline), finished jobs and their keys are gone, a running job
    is kept."""

    async def scenario(queue):
        done = [job(key=f"k{i}", t=i) for i in range(3)]
        running = job(t=9)
        for j in [*done, running]:
            await queue.submit(j)
        await queue.claim(10, 0)
        await queue.complete_many([JobResult(j.id, JobState.SUCCEEDED) for j in done])
        for j in [*done, running]:
            queue.forget_soon(j.id)
        await asyncio.sleep(0.1)
        gone = [await queue.status(j.id) for j in done]
        again, created = await queue.submit(job(key="k0"))  # the key is free again
        return gone, await queue.status(running.id), again.id != done[0].id and created

    gone, running, fresh = run(scenario, make())
    assert gone == [None, None, None] and fresh
    assert running is not None and running.state is JobState.RUNNING


def test_forget_drops_a_delivered_result_and_keeps_unfinished_jobs(make):
    async def scenario(queue):
        done, running = job(key="sync", t=1), job(t=2)
        await queue.submit(done)
        await queue.submit(running)
        await queue.claim(10, 0)
        await queue.complete(JobResult(done.id, JobState.SUCCEEDED, outputs=[b"x" * 100]))
        delivered = await queue.result(done.id, 1)
        forgot, kept = await queue.forget(done.id), await queue.forget(running.id)
        unknown = await queue.forget("job_nope")
        gone = (await queue.status(done.id), await queue.result(done.id, 0))
        events = await asyncio.wait_for(_all(queue.events(done.id)), 5)
        fresh, created = await queue.submit(job(key="sync"))  # the key is free again
        return (
            delivered,
            (forgot, kept, unknown),
            gone,
            events,
            await queue.status(running.id),
            (fresh.id != done.id and created),
        )

    delivered, answers, gone, events, running, fresh = run(scenario, make())
    assert delivered.outputs == [b"x" * 100] and answers == (True, False, False)
    assert gone == (None, None) and events == [] and fresh
    assert running.state is JobState.RUNNING


def test_position_and_eta(make):
    async def scenario(queue):
        jobs = [job(2, t=i) for i in range(3)]
        for j in jobs:
            await queue.submit(j)
        urgent = job(1, priority=3, t=9)
        await queue.submit(urgent)
        statuses = [await queue.status(j.id) for j in [*jobs, urgent]]
        events = [e async for e in _take(queue.events(urgent.id), 1)]
        return statuses, events

    statuses, events = run(scenario, make())
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


def test_cancel_queued_and_running(make):
    async def scenario(queue):
        running, waiting = job(t=1), job(t=2)
        await queue.submit(running)
        await queue.submit(waiting)
        (claimed,) = await queue.claim(1, 0)
        assert claimed.id == running.id
        assert await queue.cancel(waiting.id) is JobState.CANCELED
        assert (await queue.result(waiting.id, 0)).state is JobState.CANCELED
        assert await queue.cancel(running.id) is JobState.CANCELED
        assert await queue.is_canceled(running.id)  # the worker sees it between steps
        await queue.complete(JobResult(running.id, JobState.CANCELED, error="canceled"))
        assert not await queue.is_canceled(running.id)
        assert await queue.cancel("job_nope") is None
        assert await queue.claim(10, 0) == []  # the canceled queued job never runs
        return await queue.depth()

    assert run(scenario, make()) == (0, 0)


def test_complete_many_stores_each_result_once_after_its_steps(make):
    """The worker hands over every result of a forward pass at once: each is stored as
    complete() would (after the step events published before it), a job already done
    keeps its first result, and the jobs leave the queue."""

    async def scenario(queue):
        jobs = [job(seed=i) for i in range(3)]
        for j in jobs:
            await queue.submit(j)
        await queue.claim(3, 0)
        await queue.complete(JobResult(jobs[2].id, JobState.FAILED, error="first"))
        for j in jobs:
            await queue.publish(JobEvent(j.id, "step", {"step": 1, "steps": 1}))
        await queue.complete_many(
            [
                JobResult(j.id, JobState.SUCCEEDED, outputs=[b"png%d" % i], nfe=1)
                for i, j in enumerate(jobs)
            ]
        )
        results = [await queue.result(j.id, 1) for j in jobs]
        events = []
        for j in jobs[:2]:
            events.append([e.type async for e in queue.events(j.id)])
        return results, events, await queue.depth()

    results, events, depth = run(scenario, make())
    assert [r.outputs for r in results[:2]] == [[b"png0"], [b"png1"]]
    assert results[2].state is JobState.FAILED and results[2].error == "first"
    assert events == [["queued", "step", "succeeded"]] * 2
    assert depth == (0, 0)


def test_one_result_per_job_and_events_replay(make):
    async def scenario(queue):
        j = job()
        await queue.submit(j)
        await queue.claim(1, 0)
        await queue.publish(JobEvent(j.id, "step", {"step": 1, "steps": 2}))
        await queue.complete(JobResult(j.id, JobState.SUCCEEDED, outputs=[b"png"], nfe=2))
        await queue.complete(JobResult(j.id, JobState.FAILED, error="duplicate"))
        await queue.publish(JobEvent(j.id, "step", {"step": 2, "steps": 2}))  # too late: dropped
        await asyncio.sleep(0.05)
        events = [e async for e in queue.events(j.id)]
        resumed = [e async for e in queue.events(j.id, after=2)]
        return (await queue.result(j.id, 0)), events, resumed, await queue.status(j.id)

    result, events, resumed, status = run(scenario, make())
    assert result.state is JobState.SUCCEEDED and result.outputs == [b"png"]
    assert [e.type for e in events] == ["queued", "step", "succeeded"]
    assert [e.seq for e in events] == [1, 2, 3] and [e.type for e in resumed] == ["succeeded"]
    assert status.step == 1 and status.position is None


def test_events_arrive_live(make):
    async def scenario(queue):
        j = job()
        await queue.submit(j)
        seen = []

        async def follow():
            async for event in queue.events(j.id):
                seen.append(event.type)

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0.05)
        await queue.claim(1, 0)
        await queue.publish(JobEvent(j.id, "started", {"steps": 2}))
        await queue.publish(JobEvent(j.id, "step", {"step": 1, "steps": 2}))
        await asyncio.sleep(0.05)
        live = list(seen)
        await queue.complete(JobResult(j.id, JobState.SUCCEEDED, nfe=2))
        await asyncio.wait_for(follower, 5)
        return live, seen

    live, seen = run(scenario, make())
    assert live == ["queued", "started", "step"]
    assert seen == ["queued", "started", "step", "succeeded"]


def test_result_waits_and_times_out(make):
    async def scenario(queue):
        j = job()
        await queue.submit(j)
        missing = await queue.result(j.id, 0.05)
        await queue.claim(1, 0)

        async def finish_soon():
            await asyncio.sleep(0.02)
            await queue.complete(JobResult(j.id, JobState.SUCCEEDED))

        task = asyncio.create_task(finish_soon())
        done = await queue.result(j.id, 2.0)
        await task
        return missing, done, await queue.result("job_unknown", 0.5)

    missing, done, unknown = run(scenario, make())
    assert missing is None and done.state is JobState.SUCCEEDED and unknown is None


def test_heartbeat_keeps_what_the_worker_holds(make):
    async def scenario(queue):
        j = job()
        await queue.submit(j)
        await queue.claim(1, 0)
        return await queue.heartbeat([j.id])

    assert run(scenario, make()) == []


# -- memory only ------------------------------------------------------------------------------


def test_memory_claim_skips_a_job_that_does_not_fit():
    async def scenario(queue):
        a, b, d = job(3, t=1), job(3, t=2), job(5, t=0.5)
        for j in (a, b, d):
            await queue.submit(j)
        first = await queue.claim(4, 0)
        return [j.id for j in first], a

    first, a = run(scenario, MemoryQueue(max_queued_samples=100))
    assert first == [a.id]  # d is older but needs 5 samples: a fits and overtakes it


def test_memory_forgets_finished_jobs_beyond_retention():
    queue = MemoryQueue(max_queued_samples=100, retained_jobs=3)

    async def scenario(q):
        jobs = [job(key=f"k{i}") for i in range(5)]
        for j in jobs[:4]:
            await q.submit(j)
            await q.claim(1, 0)
            await q.complete(JobResult(j.id, JobState.SUCCEEDED))
        await q.submit(jobs[4])
        return [await q.status(j.id) for j in jobs]

    statuses = run(scenario, queue)
    assert statuses[0] is None and statuses[1] is None
    assert statuses[4].state is JobState.QUEUED


def test_memory_bounds_retained_results_by_bytes_oldest_first():
    queue = MemoryQueue(max_queued_samples=100, retained_jobs=100, retained_result_bytes=250)

    async def scenario(q):
        jobs = [job(t=i) for i in range(4)]
        for j in jobs:
            await q.submit(j)
        await q.claim(10, 0)
        for j in jobs[:3]:
            await q.complete(JobResult(j.id, JobState.SUCCEEDED, outputs=[b"x" * 100]))
        kept = [await q.status(j.id) is not None for j in jobs]
        # one result over the whole bound: the others go, the newest stays to be read
        await q.complete(JobResult(jobs[3].id, JobState.SUCCEEDED, outputs=[b"y" * 400]))
        return kept, [await q.status(j.id) is not None for j in jobs], q._result_bytes

    kept, after, held = run(scenario, queue)
    assert kept == [False, True, True, True]  # 300 bytes > 250: the oldest result went
    assert after == [False, False, False, True] and held == 400


# -- redis only --------------------------------------------------------------------------------


def rq(prefix, **kw) -> RedisStreamsQueue:
    kw.setdefault("max_queued_samples", 100)
    return RedisStreamsQueue(REDIS_URL, prefix=prefix, **kw)


def test_redis_key_names_are_the_same_in_python_and_lua(prefix):
    keys = Keys(prefix)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    lua = lua_prelude() + (
        "return {k_stream('m@1', '-3'), k_job('j'), k_result('j'), k_events('j'), "
        "k_idempotency('alice', 'i'), k_counters(), k_dead(), k_done(), k_cancel(), "
        "k_priorities('m@1'), k_models(), k_ratelimit('alice'), k_inflight('alice')}"
    )
    got = client.eval(lua, 0, prefix)
    want = [keys.stream("m@1", -3), keys.job("j"), keys.result("j"), keys.events("j")]
    want += [keys.idempotency("alice", "i"), keys.counters, keys.dead, keys.done, keys.cancel]
    want += [keys.priorities("m@1"), keys.models, keys.ratelimit("alice"), keys.inflight("alice")]
    assert got == want and all(k.startswith(prefix) for k in got)


def test_redis_claim_does_not_let_small_jobs_overtake_the_oldest(prefix):
    async def scenario(queue):
        big, small = job(5, t=1), job(1, t=2)
        await queue.submit(big)
        await queue.submit(small)
        blocked = await queue.claim(4, 0)
        both = await queue.claim(6, 0)
        return blocked, [j.id for j in both], big, small

    blocked, both, big, small = run(scenario, rq(prefix))
    assert blocked == [] and both == [big.id, small.id]


def test_redis_a_silent_holder_loses_its_jobs_to_a_live_worker(prefix):
    """Reclaim after claim_timeout (delivery 2), while heartbeats keep a live holder's."""

    async def scenario(dead, live, beating):
        lost_job, kept_job = job(t=1), job(t=2)
        await dead.submit(lost_job)
        await dead.claim(1, 0)  # then says nothing: as if killed
        await beating.submit(kept_job)
        await beating.claim(1, 0)
        assert await live.claim(10, 0) == []  # not yet idle long enough
        for _ in range(4):
            await asyncio.sleep(0.15)
            assert await beating.heartbeat([kept_job.id]) == []
        taken = await live.claim(10, 0)
        # the dead holder comes back: its heartbeat says it lost the job
        lost = await dead.heartbeat([lost_job.id])
        await live.complete(JobResult(lost_job.id, JobState.SUCCEEDED, nfe=2))
        await dead.complete(JobResult(lost_job.id, JobState.FAILED, error="late duplicate"))
        return taken, lost, lost_job, await live.result(lost_job.id, 0), live

    queues = [rq(prefix, claim_timeout=0.4) for _ in range(3)]
    taken, lost, lost_job, result, live = run(scenario, *queues)
    assert [j.id for j in taken] == [lost_job.id] and taken[0].delivery == 2
    assert lost == [lost_job.id]
    assert result.state is JobState.SUCCEEDED  # the late duplicate did not overwrite it
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    events = client.xrange(live.keys.events(lost_job.id))
    assert [e[1]["type"] for e in events].count("succeeded") == 1
    assert len(events) == 2  # queued, succeeded: the duplicate wrote nothing
    stream = live.keys.stream("toy@1", 0)
    assert client.xpending(stream, GROUP)["pending"] == 1  # only kept_job, still held


def test_redis_dead_letters_a_job_delivered_too_often(prefix):
    async def scenario(*holders):
        poison, fine = job(t=1), job(t=2)
        await holders[0].submit(poison)
        for holder in holders[:3]:
            (got,) = await holder.claim(1, 0)  # each holder dies with it
            assert got.id == poison.id
            await asyncio.sleep(0.25)
        await holders[0].submit(fine)
        survivor = holders[3]
        taken = await survivor.claim(10, 0)
        return poison, fine, taken, await survivor.result(poison.id, 1), survivor

    holders = [rq(prefix, claim_timeout=0.2, max_deliveries=3) for _ in range(4)]
    poison, fine, taken, result, survivor = run(scenario, *holders)
    assert [j.id for j in taken] == [fine.id]
    assert result.state is JobState.FAILED and result.error_code == "dead_lettered"
    assert "delivered 3 times" in result.error and survivor.keys.dead in result.error
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    (entry,) = client.xrange(survivor.keys.dead)
    assert entry[1]["id"] == poison.id and entry[1]["deliveries"] == "3"


def test_redis_results_and_cancellations_cross_processes(prefix):
    """One queue object per process: the API's waits without polling, the worker's hears
    the cancellation by pub/sub."""

    async def scenario(api, worker):
        a, b = job(t=1), job(t=2)
        await api.submit(a)
        await api.submit(b)
        await worker.claim(10, 0)
        waiting = asyncio.create_task(api.result(a.id, 10))
        await asyncio.sleep(0.1)
        begin = time.perf_counter()
        await worker.complete(JobResult(a.id, JobState.SUCCEEDED, outputs=[b"x"], nfe=2))
        result = await waiting
        latency = time.perf_counter() - begin
        await api.cancel(b.id)
        for _ in range(100):
            if await worker.is_canceled(b.id):
                break
            await asyncio.sleep(0.01)
        return result, latency, await worker.is_canceled(b.id), (await api.status(b.id)).state

    # the 0.1 s bound tells a wake-up from a poll; a full collection over a long pytest
    # session's heap (0.7-0.9 s) would be this process's pause, not the queue's
    gc.collect()
    gc.disable()
    try:
        result, latency, canceled, state = run(scenario, rq(prefix), rq(prefix))
    finally:
        gc.enable()
    assert result.outputs == [b"x"] and latency < 0.1
    assert canceled and state is JobState.CANCELED


def test_redis_forgets_finished_jobs_after_their_ttl(prefix):
    async def scenario(queue):
        j = job(key="once")
        await queue.submit(j)
        await queue.claim(1, 0)
        await queue.complete(JobResult(j.id, JobState.SUCCEEDED))
        kept = await queue.status(j.id)
        await asyncio.sleep(2.1)
        _, created = await queue.submit(job(key="once"))
        return kept, await queue.status(j.id), created

    kept, gone, created = run(scenario, rq(prefix, result_ttl=1))
    assert kept.state is JobState.SUCCEEDED and gone is None and created


def test_redis_unreachable_answers_queue_unavailable_fast():
    queue = RedisStreamsQueue(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)

    async def scenario(q):
        begin = time.perf_counter()
        with pytest.raises(QueueUnavailable) as info:
            await q.submit(job())
        with pytest.raises(QueueUnavailable):
            await q.status("job_x")
        return info.value, time.perf_counter() - begin

    err, took = run(scenario, queue)
    assert err.status == 503 and err.retry_after and "unavailable" in err.message
    assert took < 2


def test_a_result_record_keeps_its_base64_text_and_decodes_on_first_read():
    """A result read back from its record answers base64 with the text it came with (the
    images route never decodes it), reads like the list of bytes it was made from, and
    survives a second round trip unchanged; its JSON is the wire format the stdlib reads."""
    import json

    from service import wire
    from service.jobs import EncodedOutputs

    made = JobResult("j", JobState.SUCCEEDED, outputs=[b"\x89PNG a", b"\x00\xff b"], seeds=[1, 2])
    record = wire.dumps(made.to_dict())
    assert json.loads(record) == wire.loads(record)
    back = JobResult.from_dict(wire.loads(record))
    assert isinstance(back.outputs, EncodedOutputs) and back.outputs._bytes is None
    assert back.base64_outputs() is back.outputs.text  # no decode, no second encode
    assert back.outputs._bytes is None
    assert len(back.outputs) == 2 and back.outputs[1] == b"\x00\xff b"
    assert list(back.outputs) == made.outputs and back == made and made == back
    assert JobResult.from_dict(wire.loads(wire.dumps(back.to_dict()))) == made
    assert back.outputs != [b"other", b"\x00\xff b"]


def test_wire_json_reads_back_as_the_stdlib_writes_it():
    """service/wire.py: what the stdlib's json would write reads back the same, numpy's
    scalars included; NaN becomes null; what is not JSON is refused."""
    import json

    import numpy as np

    from service import wire

    value = {"a": [1, 2.5, None, True, "é"], 3: "int key", "f": np.float64(0.1)}
    value["n"] = {"i": np.int64(2**62), "f32": np.float32(0.5)}
    assert wire.loads(wire.dumps(value)) == {
        "a": [1, 2.5, None, True, "é"],
        "3": "int key",
        "f": 0.1,
        "n": {"i": 2**62, "f32": 0.5},
    }
    assert wire.loads(wire.dumps({k: v for k, v in value.items() if k != "n"})) == json.loads(
        json.dumps({k: v for k, v in value.items() if k != "n"})
    )
    assert wire.loads(wire.dumps([float("nan")])) == [None]
    with pytest.raises(TypeError):
        wire.dumps({"x": object()})
