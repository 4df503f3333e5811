"""The worker: claims jobs, steps their samplers in shared forward passes, stores results.

Bookkeeping runs on the event loop; forward passes and media encoding run in one worker
thread so the API stays responsive. Every job gets exactly one result: succeeded, failed
(deadline, non-finite values, engine error) or canceled, and one job's failure never stops
the others or the worker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import math
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor

from engines.modalities import Unavailable
from engines.noise import row_seeds
from service.bootstrap import resolve_device
from service.errors import QueueUnavailable
from service.jobs import Job, JobEvent, JobResult, JobState
from service.metrics import BatchStats, Metrics
from service.queue.base import JobQueue
from service.worker.scheduler import Active, Outcome, pick_batch, start, step_batch

log = logging.getLogger("fewstep.worker")
CANCEL_POLL_S = 0.25  # how often a cancel is looked for while a long pass runs


class Worker:
    def __init__(
        self,
        queue: JobQueue,
        models: dict[tuple[str, int], object],
        metrics: Metrics,
        *,
        static: bool = False,
        max_queue_delay_ms: float = 5.0,
        max_active_samples: int = 0,
        inline_compute_ms: float = 2.0,
        inline_lone_ms: float = 20.0,
        device: str = "cpu",
        claim_models: Collection[tuple[str, int]] | None = None,
        seed_rates: bool = True,
    ) -> None:
        """`claim_models`: claim only jobs of these (name, version) pairs, for a worker that
        shares the queue with others; None claims every job (the embedded worker).
        `seed_rates`: time each model's engine at start and announce it (`_seed_rates`)."""
        self.queue, self.models, self.metrics = queue, models, metrics
        self.claim_models, self.seed_rates = claim_models, seed_rates
        self.device = device
        self.static, self.max_queue_delay = static, max_queue_delay_ms / 1000
        biggest = max((m.spec.max_batch_size for m in models.values()), default=1)
        self.capacity = max_active_samples or biggest
        self.actives: list[Active] = []
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fewstep-compute")
        # Handing a pass to the compute thread costs about a millisecond on a busy small
        # machine; passes that recently took less than this run on the event loop instead.
        self.inline_compute = inline_compute_ms / 1000
        # A job alone in the worker has no other job's work to overlap with its pass, so
        # the hop buys nothing but its own two wake-ups: longer passes of a lone job run
        # inline too (the API waits at most this long to read a new request, which would
        # join at the next step anyway).
        self.inline_lone = max(inline_lone_ms, inline_compute_ms) / 1000
        self._recent: dict[str, float] = {}  # model -> moving average of step seconds
        self._stopping = False
        self._beat_s = queue.heartbeat_s
        self._alone = 0  # jobs in hand on their last try: claim nothing beside them
        self._next_beat = 0.0
        self.last_tick = time.monotonic()  # each loop pass; the worker's /healthz reads it

    def stop(self) -> None:
        """Stop claiming; run() returns once the jobs in hand are finished."""
        self._stopping = True

    async def run(self, burst: bool = False) -> None:
        """Serve until stop(); with burst, return as soon as the queue is drained."""
        outage = 0.0
        if self.seed_rates:
            await self._seed_rates()
        try:
            while True:
                self.last_tick = time.monotonic()
                try:
                    if not self._stopping:
                        await self._admit()
                    if not self.actives:
                        if self._stopping or (burst and (await self.queue.depth())[0] == 0):
                            return
                        continue
                    if self._beat_s is not None and time.monotonic() >= self._next_beat:
                        await self._heartbeat()
                    await self._tick()
                    outage = 0.0
                except QueueUnavailable as exc:
                    # the queue comes back by itself; the jobs in hand wait, none is lost
                    outage = min(max(outage * 2, 0.1), 2.0)
                    log.warning("%s; retrying in %.1f s", exc.message, outage)
                    await asyncio.sleep(outage)
                    continue
                # A tick computed inline may never suspend; yield so the API can read
                # requests and write responses between steps (else the loop starves).
                await asyncio.sleep(0)
        finally:
            self._executor.shutdown(wait=False)

    async def _seed_rates(self) -> None:
        """Tell the queue how fast each model's engine runs, so that admission predicts
        waits from the first request on (a drain rate is measured only once work waits):
        row-steps per second of the engine alone (`engine_speed`), so it overestimates what
        the whole service drains; the measured rate replaces it as soon as there is one."""
        loop = asyncio.get_running_loop()
        for (name, version), model in self.models.items():
            if model.speech is not None:  # its cost is frames, its warmup not a batch pass
                continue
            rows = min(model.spec.max_batch_size, self.capacity)
            try:
                rate, batch = await loop.run_in_executor(self._executor, engine_speed, model, rows)
                await self.queue.seed_rate(name, version, rate)
            except QueueUnavailable as exc:
                log.warning("%s@%s: engine speed not announced: %s", name, version, exc.message)
                continue
            log.info("%s@%s: engine speed %.0f row-steps/s (batch %d)", name, version, rate, batch)

    async def _heartbeat(self) -> None:
        """Keep the claims on the jobs in hand alive; drop the ones another worker took
        over after our claim lapsed (that worker stores their result)."""
        self._next_beat = time.monotonic() + self._beat_s
        lost = set(await self.queue.heartbeat([a.job.id for a in self.actives]))
        for active in [a for a in self.actives if a.job.id in lost]:
            log.warning("job %s was taken over by another worker; dropping it", active.job.id)
            self._drop(active)

    def _inline(self, key, lone: bool) -> bool:
        """Whether work whose recent runs took _recent[key] runs on the event loop."""
        return self._recent.get(key, math.inf) < (self.inline_lone if lone else self.inline_compute)

    async def _start_off_loop(self, job: Job, model, lone: bool = False) -> Active:
        """scheduler.start in the compute thread (always where the modality may block: the
        speech front end), or on the event loop for a model whose starts recently took less
        than inline_compute_ms (inline_lone_ms for a job that will be alone)."""
        key = ("start", job.model)
        call = functools.partial(_timed, start, job, model, device=self.device)
        if not job.modality.may_block and self._inline(key, lone):
            active, took = call()
        else:
            active, took = await asyncio.get_running_loop().run_in_executor(self._executor, call)
        self._learn(key, took)
        return active

    def _learn(self, key, took: float) -> None:
        """Moving average of how long the work itself took, wherever it ran. The thread
        hop is left out: counted in, a pass that went to the thread once because of one
        slow start would look slow for ever (every later hop adds its own wake-ups) and
        never come back to the event loop."""
        self._recent[key] = 0.8 * self._recent.get(key, took) + 0.2 * took

    async def _in_thread(self, batch: list[Active]):
        """step_batch in the compute thread, and the seconds it took there; meanwhile a
        client's cancel reaches the jobs (long vocoding checks Active.should_stop)."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, _timed, step_batch, batch)
        while True:
            done, _ = await asyncio.wait({future}, timeout=CANCEL_POLL_S)
            if done:
                return future.result()
            with contextlib.suppress(QueueUnavailable):  # the pass's outcome must not be lost
                for active in batch:
                    if not active.canceled and await self.queue.is_canceled(active.job.id):
                        active.canceled = True

    async def _compute(self, batch: list[Active]):
        """step_batch on the event loop if this model's passes are short, else in the thread."""
        name = batch[0].job.model
        if self._inline(name, lone=len(batch) == 1 == len(self.actives)):
            (outcomes, seconds), took = _timed(step_batch, batch)
        else:
            (outcomes, seconds), took = await self._in_thread(batch)
        # the whole tick counts (forward, sampler steps, encoding): that is what an inline
        # tick would keep the API waiting for
        self._learn(name, took)
        return outcomes, seconds

    async def _admit(self) -> None:
        if (self.static and self.actives) or self._alone:
            # static batching: a batch runs to the end before the next is formed
            return
        free = self.capacity - sum(a.rows for a in self.actives)
        if free <= 0:
            return
        jobs = await self.queue.claim(free, 0.05 if not self.actives else 0.0, self.claim_models)
        if self.static and jobs:
            deadline = time.monotonic() + self.max_queue_delay
            while sum(j.samples for j in jobs) < self.capacity and time.monotonic() < deadline:
                more = await self.queue.claim(
                    self.capacity - sum(j.samples for j in jobs),
                    deadline - time.monotonic(),
                    self.claim_models,
                )
                if not more:
                    break
                jobs += more
        lone = len(jobs) == 1 and not self.actives
        for job in jobs:
            await self._start(job, lone)

    async def _start(self, job: Job, lone: bool = False) -> None:
        if job.expired():
            await self._finish_job(
                job,
                JobState.FAILED,
                "deadline_exceeded",
                "the deadline passed while the job was queued; no compute was used",
            )
            return
        model = self.models.get((job.model, job.version))
        if model is None:
            await self._finish_job(
                job,
                JobState.FAILED,
                "model_not_loaded",
                f"model {job.model} version {job.version} is not loaded on this worker",
            )
            return
        try:
            active = await self._start_off_loop(job, model, lone)
        except Unavailable as exc:
            await self._finish_job(job, JobState.FAILED, "unavailable", str(exc))
            return
        except ValueError as exc:
            await self._finish_job(job, JobState.FAILED, "invalid_parameter", str(exc))
            return
        except Exception as exc:  # one job's start never takes the worker down
            log.exception("job %s could not start", job.id)
            await self._finish_job(
                job, JobState.FAILED, "start_failed", f"the job could not start: {exc}"
            )
            return
        self.actives.append(active)
        self._alone += job.alone
        self.metrics.active_jobs.labels(job.model).inc()
        data = {"steps": active.nfe_total}
        if job.delivery > 1:
            data["delivery"] = job.delivery  # an earlier worker died with it
        await self.queue.publish(JobEvent(job.id, "started", data))

    async def _tick(self) -> None:
        for active in list(self.actives):
            if await self.queue.is_canceled(active.job.id):
                await self._finish(active, JobState.CANCELED, "canceled", "canceled by the client")
            elif active.job.expired():
                await self._finish(
                    active,
                    JobState.FAILED,
                    "deadline_exceeded",
                    f"the deadline passed after {active.nfe} of {active.nfe_total} steps",
                )
        if not self.actives:
            return
        batch = pick_batch(self.actives, static=self.static)
        if not batch:
            return
        now = time.time()
        for active in batch:
            active.first_forward_at = active.first_forward_at or now
        try:
            outcomes, seconds = await self._compute(batch)
        except Exception:
            log.exception(
                "forward pass over %d requests failed; retrying them one by one", len(batch)
            )
            await self._isolate(batch)
            return
        model = batch[0].model
        rows = sum(a.rows for a in batch)
        self.metrics.observe_batch(
            BatchStats(model.spec.name, model.runtime, rows, len(batch), seconds)
        )
        # the requests this pass finished are stored together: one round trip to a shared
        # queue per pass, not one per request
        finished: list[JobResult] = []
        for outcome in outcomes:
            await self._report(outcome, finished)
        if finished:
            await self._store(*finished)

    async def _isolate(self, batch: list[Active]) -> None:
        """After a failed pass, run each request alone so only the culprit fails."""
        for active in batch:
            try:
                (outcome,), _ = await self._compute([active])
            except Exception as exc:
                await self._finish(
                    active, JobState.FAILED, "engine_error", f"the model failed: {exc}"
                )
                continue
            await self._report(outcome)

    async def _report(self, outcome: Outcome, finished: list | None = None) -> None:
        """Publish a request's step; a finished one's result is stored now, or appended
        to `finished` for the caller to store with the others of its pass."""
        active = outcome.active
        if outcome.kind == "failed":
            state = JobState.CANCELED if outcome.code == "canceled" else JobState.FAILED
            await self._finish(active, state, outcome.code, outcome.message)
            return
        data = {"step": active.nfe, "steps": active.nfe_total}
        if outcome.preview is not None:
            data["preview"] = base64.b64encode(outcome.preview).decode()
        await self.queue.publish(JobEvent(active.job.id, "step", data))
        if outcome.kind == "done":
            self._drop(active)
            job, info = active.job, outcome.info
            result = self._result(
                job, JobState.SUCCEEDED, None, None, outcome.outputs, active, info
            )
            if finished is None:
                await self._store(result)
            else:
                finished.append(result)

    def _drop(self, active: Active) -> None:
        self.actives.remove(active)
        self._alone -= active.job.alone
        self.metrics.active_jobs.labels(active.job.model).dec()

    async def _finish(
        self, active: Active, state: JobState, code, message, outputs=(), info=None
    ) -> None:
        self._drop(active)
        await self._finish_job(active.job, state, code, message, list(outputs), active, info)

    async def _finish_job(
        self, job: Job, state, code, message, outputs=(), active: Active | None = None, info=None
    ):
        await self._store(self._result(job, state, code, message, outputs, active, info))

    def _result(
        self, job: Job, state, code, message, outputs=(), active: Active | None = None, info=None
    ) -> JobResult:
        """The job's result, counted in the metrics."""
        now = time.time()
        started = active.first_forward_at if active and active.first_forward_at else now
        model = self.models.get((job.model, job.version))
        result = JobResult(
            job.id,
            state,
            outputs=list(outputs),
            media_type=job.modality.media_type(job.output_format),
            seeds=_seeds(job, info) if outputs else [],
            nfe=active.nfe if active else 0,
            queue_seconds=started - job.submit_time,
            compute_seconds=now - started,
            total_seconds=now - job.submit_time,
            forward_seconds=active.forward_seconds if active else 0.0,
            runtime=model.runtime if model else "",
            fingerprint=model.fingerprint if model else "",
            error=message,
            error_code=code,
            info=info,
        )
        self.metrics.observe_result(job, result)
        return result

    async def _store(self, *results: JobResult) -> None:
        """Hand the results to the queue, retrying while the queue is unavailable: a job
        is acknowledged only once its result is stored, so it is never lost (a result
        stored twice counts once)."""
        delay = 0.05
        while True:
            try:
                await self.queue.complete_many(list(results))
                return
            except QueueUnavailable as exc:
                names = ", ".join(r.job_id for r in results)
                log.warning("storing the result of %s: %s", names, exc.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


def engine_speed(model, max_rows: int, budget_s: float = 0.05) -> tuple[float, int]:
    """Row-evaluations per second of the model's engine, and the batch that gave it: one
    pass of zeros at 8, 32, 128, ... rows up to max_rows, stopping after the first pass
    over budget_s. A GPU's passes stay short, so it reaches its largest batch (where it is
    fastest per row); a CPU's cost per row hardly changes with the batch, so a small one
    says as much and start-up does not wait seconds for a pass of 256 rows."""
    best, best_rows, rows = 0.0, 1, min(8, max_rows)
    while True:
        seconds = model.warmup((rows,))
        if rows / seconds > best:
            best, best_rows = rows / seconds, rows
        if seconds > budget_s or rows >= max_rows:
            return best, best_rows
        rows = min(rows * 4, max_rows)


def _timed(fn, *args, **kwargs):
    """fn's result and the seconds it took (measured where it runs)."""
    begin = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - begin


def _seeds(job: Job, info) -> list[int]:
    """Each output's seed: the request's row seeds, or the modality's (a best_of pick)."""
    chosen = info.output_seeds() if info is not None else None
    return chosen or row_seeds(job.seed, job.n)


def build_worker(queue, models: dict, metrics: Metrics, settings, claim_models=None) -> Worker:
    """The worker `fewstep serve` and `fewstep worker` run, configured from Settings."""
    return Worker(
        queue,
        models,
        metrics,
        static=settings.batching == "static",
        max_queue_delay_ms=settings.max_queue_delay_ms,
        max_active_samples=settings.max_active_samples,
        inline_compute_ms=settings.inline_compute_ms,
        inline_lone_ms=settings.inline_lone_ms,
        device=resolve_device(settings.device),
        claim_models=claim_models,
    )
