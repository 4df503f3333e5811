"""The Redis Streams backend: API processes and workers on any machines share one Redis.

Each model version has one stream per priority and one consumer group of all workers;
every worker process is its own consumer. A job moves through one atomic Lua script per
step (`redis_scripts.py`):

- submit: admission against the queued-samples counter, Idempotency-Key, XADD, the
  `queued` event, a wake-up message for idle workers;
- claim: XREADGROUP of the highest-priority oldest entries that fit the caller's free
  samples (entries count jobs, jobs carry n samples: the script reads one entry at a time
  and stops at the first that does not fit); first it takes over entries whose holder went
  quiet for `claim_timeout` (XPENDING IDLE + XCLAIM) and dead-letters the ones delivered
  `max_deliveries` times, giving them a failed result that says why;
- complete: SET NX of the result with a TTL, the terminal event, XACK + XDEL, and a message
  on the `done` channel, so a result is written exactly once and the entry is acknowledged
  only after it is stored;
- heartbeat: the holder re-claims its entries with XCLAIM JUSTID (idle time reset, no
  delivery counted), learns which it lost and which were canceled.

API processes learn of results from the `done` channel (no polling), workers of
cancellations from `cancel`; an idle worker blocks in XREADGROUP, so Redis hands it the
next job the moment it is queued. Pub/sub is at-most-once, so every waiter also reads the
result key after subscribing, re-reads after a reconnect, and the heartbeat re-reads
cancellations. A Redis that does not answer within `timeout` raises
QueueUnavailable (HTTP 503 with Retry-After), never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.retry import Retry

from service import wire
from service.errors import Conflict, QueueFull
from service.jobs import Job, JobEvent, JobResult, JobState, JobStatus
from service.queue.backlog import Backlog, WorkAhead, WorkRate
from service.queue.keys import GROUP, Keys, model_version
from service.queue.memory import DrainRate
from service.queue.redis_common import (
    DOWN,
    INLINE_RESULT_BYTES,
    _guarded,
    _unavailable,
    consumer_name,
    transient,
)
from service.queue.redis_scripts import sources
from service.queue.redis_worker import WorkerSide

log = logging.getLogger("fewstep.queue")


# how long an API process judges by a worker's announced speed (JobQueue.seed_rate) without
# reading it again: until a drain rate is measured (light load), each read is a round trip
SEED_TTL_S = 5.0


class RedisStreamsQueue(WorkerSide):
    """JobQueue over Redis Streams; see the module docstring for the protocol."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "fewstep:",
        max_queued_samples: int = 1024,
        claim_timeout: float = 30.0,
        max_deliveries: int = 3,
        result_ttl: float = 86400.0,
        timeout: float = 2.0,
        consumer: str | None = None,
    ) -> None:
        self.url, self.keys = url, Keys(prefix)
        self.max_queued_samples, self.max_deliveries = max_queued_samples, max_deliveries
        self.claim_timeout, self.timeout = claim_timeout, timeout
        self.result_ttl = max(1, round(result_ttl))
        self.heartbeat_s = claim_timeout / 4  # the worker re-claims what it holds this often
        self.consumer = consumer or consumer_name()
        self.drain = DrainRate()
        self._rates: dict[str, WorkRate] = {}  # model@version -> row-steps/s while busy
        # model@version -> (a worker's announced speed, when this process read it): what
        # drain_rate reports until a rate is measured, re-read from Redis after SEED_TTL_S
        self._seeds: dict[str, tuple[float, float]] = {}
        self.redis: aioredis.Redis | None = None
        self._sources = sources()
        self._shas = {k: hashlib.sha1(v.encode()).hexdigest() for k, v in self._sources.items()}
        self._held: dict[str, tuple[str, str]] = {}  # job id -> (stream, entry) we hold
        self._canceled: set[str] = set()  # held jobs whose client canceled them
        self._waiters: dict[str, list[asyncio.Future]] = {}
        # jobs this process submitted while the done channel was subscribed, with the
        # subscription's number: their completion cannot be missed, so result() need not
        # read the result key first (one round trip less per synchronous request)
        self._fresh: OrderedDict[str, int] = OrderedDict()
        # jobs whose completion arrived while nobody waited (a fast job, a busy API)
        self._unclaimed_done: OrderedDict[str, None] = OrderedDict()
        self._done_epoch = 0  # counts subscriptions of the done channel; odd: subscribed
        self._outbox: list[JobEvent] = []
        self._forgets: list[str] = []  # forget_soon's job ids, sent with the next flush
        self._takes: list[str] = []  # stream, entry, ... read by XREADGROUP, not yet marked
        self._flusher: asyncio.Task | None = None
        self._write_lock = asyncio.Lock()
        self._streams: tuple[float, list[str], list[str]] = (0.0, [], [])  # expiry, for, keys
        self._listeners: dict[str, asyncio.Task] = {}
        self._next_reclaim = 0.0
        self._closing = False
        dead = JobResult(
            "\0", JobState.FAILED, error=self._dead_message(), error_code="dead_lettered"
        )
        self._dead_head, self._dead_tail = json.dumps(dead.to_dict()).split("\\u0000")

    def _dead_message(self) -> str:
        return (
            f"the job was delivered {self.max_deliveries} times and no worker finished it "
            "(each time its worker died or lost it), so it was moved to the dead-letter "
            f"stream {self.keys.dead}; check the workers' logs, then resubmit"
        )

    # -- connection ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect lazily: an API starts (and answers 503) while Redis is away."""
        self.redis = aioredis.Redis.from_url(
            self.url,
            decode_responses=True,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            # one immediate retry on a fresh connection covers pooled connections that a
            # Redis restart closed; a timeout is not retried, so a hung Redis costs `timeout`
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )

    async def close(self) -> None:
        # redis-py can swallow a cancellation that lands mid-subscribe, so the subscribers
        # also watch this flag (they wake at least once a second)
        self._closing = True
        tasks = list(self._listeners.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.timeout + 1.5)
        self._listeners.clear()
        with contextlib.suppress(*DOWN):
            await self._flush()
            if not self._held:
                await self._script("forget_consumer", self.consumer)
        if self.redis is not None:
            await self.redis.aclose()

    def _queue_script(self, pipe, name: str, *args) -> None:
        pipe.evalsha(self._shas[name], 0, self.keys.prefix, GROUP, *args)

    async def _script(self, name: str, *args):
        """EVALSHA with the prefix and group first; loads the script when Redis lost it
        (a restart flushes scripts)."""
        argv = (self.keys.prefix, GROUP, *args)
        try:
            return await self.redis.evalsha(self._shas[name], 0, *argv)
        except NoScriptError:
            await self._load_scripts()
            return await self.redis.evalsha(self._shas[name], 0, *argv)

    async def _load_scripts(self) -> None:
        for name, source in self._sources.items():
            self._shas[name] = await self.redis.script_load(source)

    # -- submit, status, cancel (API side) -------------------------------------------------

    @_guarded
    async def submit(
        self, job: Job, fingerprint: str = "", max_ahead: float | None = None
    ) -> tuple[Job, bool]:
        self._listen("done")  # completions feed the drain rate behind Retry-After and ETAs
        reply = await self._script(
            "submit",
            job.id,
            wire.dumps(job.to_dict()),
            job.samples,
            fingerprint,
            self.max_queued_samples,
            model_version(job.model, job.version),
            job.priority,
            job.idempotency_key or "",
            time.time(),
            job.owner,
            job.cost,
            "" if max_ahead is None else repr(float(max_ahead)),
        )
        if reply[0] == "ahead":
            raise WorkAhead(int(reply[1]))
        if reply[0] == "conflict":
            raise Conflict(
                "this Idempotency-Key was used with a different request; "
                "use a new key for a new request",
                param="Idempotency-Key",
            )
        if reply[0] == "existing":
            return Job.from_dict(wire.loads(reply[1])), False
        if reply[0] == "created" and self._done_epoch % 2:
            self._fresh[job.id] = self._done_epoch
            if len(self._fresh) > 10000:
                self._fresh.popitem(last=False)
        if reply[0] == "full":
            queued = int(reply[1])
            excess = queued + job.samples - self.max_queued_samples
            eta = self.drain.seconds_for(excess)
            raise QueueFull(
                f"the queue holds {queued} samples (limit {self.max_queued_samples}); "
                "retry after the Retry-After interval or lower n",
                retry_after=1.0 if eta is None else min(max(eta, 1.0), 60.0),
            )
        return job, True

    @_guarded
    async def status(self, job_id: str) -> JobStatus | None:
        reply = await self._script("status", job_id)
        if reply is None:
            return None
        data, state, step, steps, error, jobs_ahead, samples_ahead = reply
        position = eta = None
        if int(jobs_ahead) >= 0:
            position = int(jobs_ahead)
            eta = self.drain.seconds_for(int(samples_ahead)) if int(samples_ahead) else 0.0
        job = Job.from_dict(wire.loads(data))
        return JobStatus(job, JobState(state), position, eta, int(step), int(steps), error or None)

    @_guarded
    async def cancel(self, job_id: str) -> JobState | None:
        result = JobResult(job_id, JobState.CANCELED, error="canceled by the client")
        state = await self._script(
            "cancel",
            job_id,
            wire.dumps(result.to_dict()),
            result.error,
            json.dumps({"error": result.error}),
            self.result_ttl,
            time.time(),
            INLINE_RESULT_BYTES,
        )
        if state is None:
            return None
        if job_id in self._held:
            self._canceled.add(job_id)  # held here: the worker sees it at its next step
        return JobState(state)

    @_guarded
    async def forget(self, job_id: str) -> bool:
        self._unclaimed_done.pop(job_id, None)
        return bool(await self._script("forget", job_id))

    def forget_soon(self, job_id: str) -> None:
        self._unclaimed_done.pop(job_id, None)
        self._forgets.append(job_id)
        self._flush_soon()  # with whatever else is buffered, in one pipeline

    @_guarded
    async def depth(self) -> tuple[int, int]:
        jobs, samples = await self.redis.hmget(self.keys.counters, "jobs", "samples")
        return int(jobs or 0), int(samples or 0)

    @_guarded
    async def backlog(self, model: str, version: int) -> Backlog:
        self._listen("done")  # completions measure the drain rate
        mv = model_version(model, version)
        work = await self.redis.hgetall(self.keys.work(mv))
        seed = _float(work.pop("seed", None))  # a worker's engine speed, until a rate is measured
        if seed is None:
            self._seeds.pop(mv, None)
        else:
            self._seeds[mv] = (seed, time.monotonic())
        work.pop("queued", None)
        by_priority = {int(p): int(w) for p, w in work.items() if int(w) > 0}
        return Backlog(by_priority, self.drain_rate(model, version))  # measured, else the seed

    def drain_rate(self, model: str, version: int) -> float | None:
        """The drain rate this process measured from the done channel (`backlog` and
        `submit` start the listening), else the speed a worker announced as this process's
        last `backlog` read found it, for SEED_TTL_S (then None: admission reads the
        backlog again, and with it the seed, so a new worker's speed is seen)."""
        mv = model_version(model, version)
        rate = self._rates.get(mv)
        measured = rate.rate if rate is not None else None
        if measured is not None:
            return measured
        seed, read = self._seeds.get(mv, (None, 0.0))
        return seed if time.monotonic() - read < SEED_TTL_S else None

    @_guarded
    async def seed_rate(self, model: str, version: int, row_steps_per_s: float) -> None:
        mv = model_version(model, version)
        await self.redis.hset(self.keys.work(mv), "seed", repr(float(row_steps_per_s)))

    # -- results and events ---------------------------------------------------------------

    async def result(self, job_id: str, timeout: float) -> JobResult | None:
        """The result, waiting up to `timeout` on the done channel. While Redis is away a
        waiter keeps waiting (its job is safe) and re-reads the result once it is back."""
        if timeout <= 0:
            try:
                raw = await self.redis.get(self.keys.result(job_id))
            except DOWN as exc:
                raise _unavailable(exc) from exc
            return None if raw is None else JobResult.from_dict(wire.loads(raw))
        self._listen("done")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        epoch = self._done_epoch
        fresh = self._fresh.pop(job_id, None) == epoch
        fresh = fresh and job_id not in self._unclaimed_done
        while True:
            waiter = loop.create_future()
            self._waiters.setdefault(job_id, []).append(waiter)
            try:
                # read after subscribing: a result stored before that is found here
                if not fresh or self._done_epoch != epoch:
                    with contextlib.suppress(*DOWN):
                        async with self.redis.pipeline(transaction=False) as pipe:
                            pipe.get(self.keys.result(job_id)).exists(self.keys.job(job_id))
                            raw, known = await pipe.execute()
                        if raw is not None:
                            return JobResult.from_dict(wire.loads(raw))
                        if not known:
                            return None
                fresh = False
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                try:
                    payload = await asyncio.wait_for(waiter, remaining)
                except TimeoutError:
                    return None
                if payload:
                    return JobResult.from_dict(wire.loads(payload))
            finally:
                waiters = self._waiters.get(job_id, [])
                if waiter in waiters:
                    waiters.remove(waiter)
                if not waiters:
                    self._waiters.pop(job_id, None)

    async def events(self, job_id: str, after: int = 0) -> AsyncIterator[JobEvent]:
        """Replay from the job's event stream, then block on it for new ones; rides out a
        Redis outage (the events are kept) instead of ending the client's stream."""
        key, last, delay = self.keys.events(job_id), "0-0", 0.1
        block_ms = max(1, int(min(1.0, self.timeout / 2) * 1000))
        first = True
        while True:
            try:
                if first:
                    if not await self.redis.exists(self.keys.job(job_id), key):
                        return
                    entries = await self.redis.xrange(key, "-", "+")
                    first = False
                else:
                    reply = await self.redis.xread({key: last}, block=block_ms)
                    entries = reply[0][1] if reply else []
                    if not entries and not await self.redis.exists(key, self.keys.job(job_id)):
                        return  # expired
            except (*DOWN, ResponseError) as exc:
                if isinstance(exc, ResponseError) and not transient(exc):
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            for entry_id, f in entries:
                last = entry_id
                event = JobEvent(
                    job_id, f["type"], json.loads(f["data"]), int(f["seq"]), float(f["time"])
                )
                if event.seq <= after:
                    if event.terminal:
                        return  # finished, and the client has seen its end already
                    continue
                yield event
                if event.terminal:
                    return

    # -- pub/sub ----------------------------------------------------------------------------

    def _listen(self, role: str, models: list[str] | None = None) -> None:
        """Start the subscriber this role needs, once: 'done' for result waiters and the
        drain rate, 'worker' for new jobs of the worker's models and cancellations."""
        task = self._listeners.get(role)
        if task is not None and not task.done():
            return
        if role == "done":
            channels, patterns = [self.keys.done], []
        else:
            channels, patterns = [self.keys.cancel], []
        self._listeners[role] = asyncio.get_running_loop().create_task(
            self._subscribe(channels, patterns, role == "done"), name=f"fewstep-redis-{role}"
        )

    async def _subscribe(self, channels: list[str], patterns: list[str], done: bool) -> None:
        delay = 0.1
        while not self._closing:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                if channels:
                    await pubsub.subscribe(*channels)
                if patterns:
                    await pubsub.psubscribe(*patterns)
                delay = 0.1
                self._recheck()  # anything sent while we were not listening
                while not self._closing:
                    message = await pubsub.get_message(timeout=1.0)
                    if done and not self._done_epoch % 2:
                        # the first read took the subscription's confirmation
                        self._done_epoch += 1
                    if message is not None:
                        self._dispatch(message["channel"], message["data"])
            except DOWN as exc:
                log.warning("redis subscriber lost its connection (%s); reconnecting", exc)
            finally:
                if done and self._done_epoch % 2:
                    self._done_epoch += 1  # even: not subscribed
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _dispatch(self, channel: str, data: str) -> None:
        if channel == self.keys.done:
            job_id, n, state, stats, payload = data.split("\n", 4)
            if state == JobState.SUCCEEDED.value:
                self.drain.add(int(n))
                mv, cost, queued = stats.rsplit(" ", 2)
                rate = self._rates.setdefault(mv, WorkRate())
                rate.add(int(cost), busy=int(queued) > 0)
            waiters = self._waiters.get(job_id, ())
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(payload)
            if not waiters:  # result() must then read the result key
                self._unclaimed_done[job_id] = None
                if len(self._unclaimed_done) > 10000:
                    self._unclaimed_done.popitem(last=False)
        elif channel == self.keys.cancel and data in self._held:
            self._canceled.add(data)

    def _recheck(self) -> None:
        """After (re)subscribing: result waiters re-read their result."""
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result("")


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None
