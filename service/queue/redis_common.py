"""What both halves of the Redis Streams queue share: which errors mean "Redis is away",
how they become QueueUnavailable (HTTP 503), and the worker's consumer name."""

from __future__ import annotations

import functools
import os
import socket
import uuid

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import QueueUnavailable

# Redis is away (or full, past its maxmemory under noeviction; a replica being promoted,
# READONLY / MASTERDOWN / TRYAGAIN during a failover), not wrong: a 503, retry
DOWN = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    OutOfMemoryError,
    ReadOnlyError,
    MasterDownError,
    TryAgainError,
)
# error replies of a server changing role, which redis-py raises as a plain ResponseError:
# a blocked XREADGROUP is released with UNBLOCKED when its primary becomes a replica
TRANSIENT_REPLIES = ("UNBLOCKED", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")
INLINE_RESULT_BYTES = 256 * 1024  # results up to this size travel on the done channel


def transient(exc: ResponseError) -> bool:
    """Whether an error reply means "a server changing role": retry, as when it is away."""
    return str(exc).startswith(TRANSIENT_REPLIES)


def _unavailable(exc: Exception) -> QueueUnavailable:
    return QueueUnavailable(
        f"the job queue (Redis) is unavailable: {exc}; nothing was lost, retry after the "
        "Retry-After interval",
        retry_after=2,
    )


def _guarded(method):
    """Translate 'Redis is away' into QueueUnavailable for the API's 503."""

    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except DOWN as exc:
            raise _unavailable(exc) from exc
        except ResponseError as exc:
            if transient(exc):
                raise _unavailable(exc) from exc
            raise

    return wrapper


def consumer_name() -> str:
    """Unique per worker process, and says where it runs: host:pid:random."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
