"""What KEDA's redis-streams trigger reads from fewstep's queue, on the real Redis: the
consumer group's `lag` (XINFO GROUPS, the lagCount mode) and its pending entries (XPENDING,
the pendingEntriesCount mode) while jobs are added, claimed and acknowledged, starting
with zero workers. The replica counts are KEDA's: ceil(metric / target) per trigger, the
largest trigger wins, and any lag above activationLagCount wakes the first worker."""

from __future__ import annotations

import asyncio
import math

import redis

from engines.modalities import ImageInputs
from service.jobs import Job, JobResult, JobState
from service.queue.keys import GROUP, Keys
from service.queue.redis_streams import RedisStreamsQueue
from tests.service.redisutil import REDIS_URL

from .manifests import find, render

MODEL = ("fashion-edm", 2)


def triggers() -> dict[str, dict]:
    scaled = find(render("distributed-keda"), "ScaledObject", "fewstep-worker")["spec"]
    return {
        "lag" if "lagCount" in t["metadata"] else "pending": t["metadata"]
        for t in scaled["triggers"]
    }


def keda_reads(client: redis.Redis, stream: str) -> dict:
    """The two numbers KEDA's scaler asks Redis for, as it asks them."""
    group = next(g for g in client.xinfo_groups(stream) if g["name"] == GROUP)
    return {"lag": group["lag"], "pending": client.xpending(stream, GROUP)["pending"]}


def replicas(reads: dict) -> int:
    t = triggers()
    if reads["lag"] is None:  # KEDA cannot compute the lag: its fallback replicas apply
        return -1
    active = reads["lag"] > int(t["lag"]["activationLagCount"]) or reads["pending"] > 0
    if not active:
        return 0
    return max(
        math.ceil(reads["lag"] / int(t["lag"]["lagCount"])),
        math.ceil(reads["pending"] / int(t["pending"]["pendingEntriesCount"])),
    )


def job(i: int) -> Job:
    return Job(MODEL[0], MODEL[1], ImageInputs([7]), 1, "euler", 2, i)


def test_keda_metrics_follow_jobs_from_zero_workers_to_zero_again(prefix):
    stream = Keys(prefix).stream(f"{MODEL[0]}@{MODEL[1]}", 0)
    assert triggers()["lag"]["stream"] == Keys("fewstep:").stream(f"{MODEL[0]}@{MODEL[1]}", 0)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)

    async def scenario() -> list[tuple[str, dict, int]]:
        api = RedisStreamsQueue(REDIS_URL, prefix=prefix)
        worker = RedisStreamsQueue(REDIS_URL, prefix=prefix)
        await api.start()
        await worker.start()
        seen = []

        def note(what: str) -> None:
            reads = keda_reads(client, stream)
            seen.append((what, reads, replicas(reads)))

        try:
            jobs = [(await api.submit(job(i)))[0] for i in range(20)]
            note("20 jobs, no worker has ever run")
            held = await worker.claim(16, 0.5, [MODEL])
            note("one worker claimed 16")
            for j in held[:10]:
                await worker.complete(JobResult(j.id, JobState.SUCCEEDED))
            note("10 of them done")
            for j in held[10:]:
                await worker.complete(JobResult(j.id, JobState.SUCCEEDED))
            rest = await worker.claim(16, 0.5, [MODEL])
            note("the last 4 claimed")
            for j in rest:
                await worker.complete(JobResult(j.id, JobState.SUCCEEDED))
            note("all done")
            assert len(jobs) == 20 and len(held) + len(rest) == 20
            queued = (await api.submit(job(99)))[0]
            await api.cancel(queued.id)
            note("a queued job canceled")
            assert await worker.claim(16, 0.2, [MODEL]) == []
            note("a worker found nothing to claim")
        finally:
            await api.close()
            await worker.close()
        return seen

    seen = asyncio.run(scenario())
    for what, reads, count in seen:
        print(f"{what:38s} lag={reads['lag']} pending={reads['pending']} -> {count} workers")
    got = {what: (reads["lag"], reads["pending"], count) for what, reads, count in seen}
    assert got["20 jobs, no worker has ever run"] == (20, 0, 3)  # wakes from zero: ceil(20/8)
    assert got["one worker claimed 16"] == (4, 16, 1)
    assert got["10 of them done"] == (4, 6, 1)  # in-flight work keeps its worker
    assert got["the last 4 claimed"] == (0, 4, 1)
    assert got["all done"] == (0, 0, 0)  # scale to zero after the cooldown
    # A canceled queued job's entry is deleted (XDEL), but Redis counts it in the group's lag
    # until a consumer reads past it: at zero workers, one cancel wakes one worker, whose
    # first read brings the lag back to 0 (and KEDA back to zero after its cooldown).
    assert got["a queued job canceled"] == (1, 0, 1)
    assert got["a worker found nothing to claim"] == (0, 0, 0)
