"""The queue a process uses, from its settings: in-process memory or Redis Streams."""

from __future__ import annotations

from service.config import Settings
from service.queue.base import JobQueue
from service.queue.memory import MemoryQueue


def make_queue(settings: Settings) -> JobQueue:
    if settings.queue == "memory":
        return MemoryQueue(
            settings.max_queued_samples, settings.retained_jobs, settings.retained_result_bytes
        )
    from service.queue.redis_streams import RedisStreamsQueue

    return RedisStreamsQueue(
        settings.queue,
        prefix=settings.redis_prefix,
        max_queued_samples=settings.max_queued_samples,
        claim_timeout=settings.claim_timeout_s,
        max_deliveries=settings.max_deliveries,
        result_ttl=settings.result_ttl_s,
        timeout=settings.redis_timeout_s,
    )
