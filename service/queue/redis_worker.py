"""The worker side of the Redis Streams queue: claim, heartbeat, cancellation checks,
batched event publishing and complete. `RedisStreamsQueue` (redis_streams.py, which holds
the connection, the API side and the pub/sub listeners) mixes it in; see that module's
docstring for the protocol."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Collection

from redis.exceptions import NoScriptError

from service import wire
from service.jobs import Job, JobEvent, JobResult, JobState
from service.queue.keys import GROUP, model_version
from service.queue.redis_common import DOWN, INLINE_RESULT_BYTES, _guarded, _unavailable

log = logging.getLogger("fewstep.queue")


class WorkerSide:
    """Methods of RedisStreamsQueue that a worker calls (state lives on the queue)."""

    # -- worker side ------------------------------------------------------------------------

    @_guarded
    async def claim(
        self, max_samples: int, timeout: float, models: Collection[tuple[str, int]] | None = None
    ) -> list[Job]:
        names = sorted(model_version(m, v) for m, v in models) if models is not None else []
        self._listen("worker", names)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            reclaim = loop.time() >= self._next_reclaim
            if reclaim:
                self._next_reclaim = loop.time() + self.claim_timeout / 4
            rows = await self._script(
                "claim",
                self.consumer,
                max_samples,
                int(reclaim),
                int(self.claim_timeout * 1000),
                self.max_deliveries,
                self.result_ttl,
                time.time(),
                INLINE_RESULT_BYTES,
                self._dead_head,
                self._dead_tail,
                self._dead_message(),
                json.dumps({"error": self._dead_message()}),
                int(not self._held),
                *names,
            )
            if rows:
                return [self._hold(*row) for row in rows]
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            if self._held:  # (static batching topping up a batch) look again shortly
                await asyncio.sleep(min(remaining, 0.005))
                continue
            rows = await self._wait_for_entry(names, remaining)
            if rows:
                return [self._hold(*row) for row in rows]

    async def _wait_for_entry(self, names: list[str], timeout: float) -> list:
        """An idle worker blocks in XREADGROUP, so Redis hands the next entry (which carries
        the job) to exactly one waiting worker the moment it is added: one hop, and no herd
        of workers woken to race for it. The worker starts at once; the TAKE script that
        marks the job running goes out with its first events (if the worker dies before,
        the entry is pending and is reclaimed like any other)."""
        loop = asyncio.get_running_loop()
        expiry, known_for, streams = self._streams
        if loop.time() >= expiry or known_for != names:
            streams = await self._script("streams", *names)
            # a stream created meanwhile (new model or priority) is seen within a second
            self._streams = (loop.time() + (1.0 if streams else 0.0), names, streams)
        if not streams:
            await asyncio.sleep(min(timeout, 0.05))
            return []
        block_s = min(timeout, 0.25, self.timeout / 2)
        reply = await self.redis.xreadgroup(
            GROUP,
            self.consumer,
            dict.fromkeys(streams, ">"),
            count=1,
            block=max(1, int(block_s * 1000)),
        )
        rows = []
        for stream, entries in reply or ():
            for entry, fields in entries:
                if fields:  # None: deleted since; TAKE acknowledges it
                    rows.append((fields["job"], JobState.RUNNING.value, 1, stream, entry))
                self._takes += [stream, entry]
        if self._takes:
            self._flush_soon()
        return rows

    def _hold(self, data: str, state: str, delivery: int, stream: str, entry: str) -> Job:
        job = Job.from_dict(wire.loads(data))
        job.delivery = int(delivery)
        job.alone = job.delivery > 1 and job.delivery >= self.max_deliveries
        self._held[job.id] = (stream, entry)
        if state == JobState.CANCELED.value:
            self._canceled.add(job.id)
        return job

    async def heartbeat(self, job_ids: Collection[str]) -> list[str]:
        """Keep the claims on these held jobs alive; returns the ones this worker lost (its
        claim lapsed and another worker took them over: that one finishes them)."""
        args = []
        for job_id in job_ids:
            if job_id in self._held:
                args += [*self._held[job_id], job_id]
        if not args:
            return []
        try:
            lost, canceled = await self._script("heartbeat", self.consumer, *args)
        except DOWN as exc:
            raise _unavailable(exc) from exc
        self._canceled.update(canceled)
        for job_id in lost:
            self._held.pop(job_id, None)
            self._canceled.discard(job_id)
        return list(lost)

    async def is_canceled(self, job_id: str) -> bool:
        if job_id in self._held:
            return job_id in self._canceled
        try:
            state, done = await self.redis.hget(self.keys.job(job_id), "state"), False
            if state == JobState.CANCELED.value:
                done = bool(await self.redis.exists(self.keys.result(job_id)))
        except DOWN as exc:
            raise _unavailable(exc) from exc
        return state == JobState.CANCELED.value and not done

    async def publish(self, event: JobEvent) -> None:
        """Buffer the event; the buffer goes out in one round trip at the end of the
        worker's tick (or with the job's result), not one per event."""
        self._outbox.append(event)
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_quietly())

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(*DOWN):  # kept in the outbox, sent with the next flush
            await self._flush()
            # what was buffered while that pipeline was out goes now, not with whatever
            # happens to flush next (an API's forgets may have no next)
            while self._outbox or self._takes or self._forgets:
                await self._flush()

    def _queue_events(self, pipe, events: list[JobEvent]) -> None:
        rows = []
        for e in events:
            step = str(e.data.get("step", "")) if e.type == "step" else ""
            steps = str(e.data.get("steps", "")) if e.type == "step" else ""
            rows.append([e.job_id, e.type, wire.dumps(e.data).decode(), repr(e.time), step, steps])
        self._queue_script(pipe, "publish", wire.dumps(rows))

    async def _flush(self, then=None):
        """Send buffered events, then `then(pipe)`'s commands, then buffered forgets, in one
        pipeline, in order."""
        async with self._write_lock:
            events, self._outbox = self._outbox, []
            takes, self._takes = self._takes, []
            forgets, self._forgets = self._forgets, []
            if not events and not takes and not forgets and then is None:
                return None
            try:
                for attempt in (1, 2):
                    async with self.redis.pipeline(transaction=False) as pipe:
                        if takes:
                            self._queue_script(pipe, "take", *takes)
                        if events:
                            self._queue_events(pipe, events)
                        if then is not None:
                            then(pipe)
                        for job_id in forgets:  # last: the replies above keep their places
                            self._queue_script(pipe, "forget", job_id)
                        try:
                            replies = await pipe.execute()
                        except NoScriptError:
                            if attempt == 2:
                                raise
                            await self._load_scripts()
                            continue
                        if takes:  # canceled while queued: the worker stops them
                            self._canceled.update(i for i in replies[0] if i in self._held)
                        return replies
            except BaseException:
                self._outbox[:0] = events
                self._takes[:0] = takes
                self._forgets[:0] = forgets
                raise

    @_guarded
    async def complete(self, result: JobResult) -> None:
        await self.complete_many([result])

    @_guarded
    async def complete_many(self, results: list[JobResult]) -> None:
        """The results' COMPLETE scripts in one pipeline, after the buffered events."""
        now = time.time()
        calls = []
        for result in results:
            data = (
                {"nfe": result.nfe}
                if result.state is JobState.SUCCEEDED
                else {"error": result.error}
            )
            calls.append(
                (
                    result.job_id,
                    wire.dumps(result.to_dict()),
                    result.state.value,
                    result.error or "",
                    json.dumps(data),
                    self.result_ttl,
                    now,
                    INLINE_RESULT_BYTES,
                )
            )

        def then(pipe) -> None:
            for args in calls:
                self._queue_script(pipe, "complete", *args)

        await self._flush(then)
        for result in results:
            self._held.pop(result.job_id, None)
            self._canceled.discard(result.job_id)
