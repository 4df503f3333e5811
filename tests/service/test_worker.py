"""The scheduler's batching rule and the worker in burst mode (no HTTP)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from engines.modalities import ImageInputs
from service.jobs import Job, JobState
from service.metrics import Metrics
from service.queue.memory import MemoryQueue
from service.worker.loop import Worker
from service.worker.scheduler import pick_batch, start

from .conftest import toy_model


def job(n=1, sampler="euler", steps=3, priority=0, t=0.0, model="toy", guidance=1.0) -> Job:
    return Job(
        model,
        1,
        ImageInputs([0] * n, guidance_scale=guidance),
        n,
        sampler,
        steps,
        1,
        priority=priority,
        submit_time=t,
    )


def test_pick_batch_takes_the_most_urgent_group_up_to_max_rows():
    toy, other = toy_model("toy"), toy_model("other")
    actives = [
        start(job(4, t=3), toy),
        start(job(2, t=2, model="other"), other),
        start(job(2, priority=1, t=5), toy),
        start(job(3, sampler="dpmpp_2m", t=1), toy),
    ]
    batch = pick_batch(actives, max_rows=8)
    # priority first, then age; mixed samplers share the pass; 'other' model waits
    assert [a.job.submit_time for a in batch] == [5, 1]
    assert sum(a.rows for a in batch) == 5
    batch = pick_batch(actives, max_rows=9)
    assert [a.job.submit_time for a in batch] == [5, 1, 3]


def test_static_mode_groups_by_sampler_and_steps():
    toy = toy_model("toy")
    kinds = [("euler", 3), ("dpmpp_2m", 3), ("euler", 3), ("euler", 5)]
    actives = [start(job(1, s, n, t=i + 1), toy) for i, (s, n) in enumerate(kinds)]
    assert [a.job.submit_time for a in pick_batch(actives, 64)] == [1, 2, 3, 4]
    assert [a.job.submit_time for a in pick_batch(actives, 64, static=True)] == [1, 3]


def test_a_request_larger_than_max_rows_still_runs_alone():
    toy = toy_model("toy")
    actives = [start(job(6, t=1), toy), start(job(1, t=2), toy)]
    assert [a.job.n for a in pick_batch(actives, max_rows=4)] == [6]


def test_cfg_rows_count_double():
    assert job(3, guidance=2.0).rows == 6 and job(3).rows == 3


def test_burst_mode_drains_the_queue_and_batches_across_requests():
    async def scenario():
        queue, metrics = MemoryQueue(), Metrics()
        toy = toy_model("toy")
        jobs = [job(1 + i % 3, sampler=["euler", "dpmpp_2m", "unipc"][i % 3], steps=2 + i % 4, t=i)
                for i in range(12)]  # fmt: skip
        for j in jobs:
            await queue.submit(j)
        worker = Worker(queue, {("toy", 1): toy}, metrics)
        await asyncio.wait_for(worker.run(burst=True), 30)
        return [await queue.result(j.id, 0) for j in jobs], metrics

    results, metrics = asyncio.run(scenario())
    assert all(r.state is JobState.SUCCEEDED for r in results)
    assert [len(r.outputs) for r in results] == [1 + i % 3 for i in range(12)]
    count = metrics.registry.get_sample_value("fewstep_batch_requests_count", {"model": "toy"})
    total = metrics.registry.get_sample_value("fewstep_batch_requests_sum", {"model": "toy"})
    assert total / count > 2  # requests really shared forward passes
    nfe = sum(r.nfe for r in results)
    assert nfe == sum(2 + i % 4 for i in range(12))


def recording(model, passes: list[tuple[str, int]]):
    """The model with a denoiser that records (model, rows) of every forward pass."""
    inner = model.denoiser

    def denoiser(x, sigma, cond):
        passes.append((model.spec.name, len(x)))
        return inner(x, sigma, cond)

    return replace(model, denoiser=denoiser)


def test_each_model_batches_up_to_its_own_max_batch_size():
    """One worker, two models with different max_batch_size: every pass keeps the limit of
    the model it runs, not of whichever request the worker happens to hold first (urgent
    requests of the other model arrive while the first model's are in hand)."""

    async def scenario(first: str, then: str):
        queue, passes = MemoryQueue(), []
        models = {
            ("small", 1): recording(toy_model("small", max_batch_size=2), passes),
            ("big", 1): recording(toy_model("big", max_batch_size=64), passes),
        }
        for i in range(6):
            await queue.submit(job(2, steps=8, model=first, t=i))
        # seed_rates off: its timing passes at max batch are not serving passes
        worker = Worker(queue, models, Metrics(), max_active_samples=64, seed_rates=False)
        running = asyncio.create_task(worker.run(burst=True))
        while not passes:
            await asyncio.sleep(0.001)
        for i in range(6):
            await queue.submit(job(2, steps=3, model=then, priority=5, t=10 + i))
        await asyncio.wait_for(running, 30)
        return passes

    for first, then in (("big", "small"), ("small", "big")):
        passes = asyncio.run(scenario(first, then))
        small = [rows for name, rows in passes if name == "small"]
        big = [rows for name, rows in passes if name == "big"]
        assert small and max(small) <= 2, (first, small)
        assert max(big) == 12, (first, big)  # all six big requests in one pass


def test_expired_and_unknown_model_jobs_fail_without_compute():
    async def scenario():
        queue = MemoryQueue()
        late = job(t=0.0)
        late.deadline = 1.0  # long past
        stray = job(model="ghost")
        for j in (late, stray):
            await queue.submit(j)
        worker = Worker(queue, {("toy", 1): toy_model("toy")}, Metrics())
        await asyncio.wait_for(worker.run(burst=True), 10)
        return await queue.result(late.id, 0), await queue.result(stray.id, 0)

    late, stray = asyncio.run(scenario())
    assert late.error_code == "deadline_exceeded" and late.nfe == 0
    assert stray.error_code == "model_not_loaded"


def test_samples_do_not_depend_on_batching_mode():
    async def scenario(static):
        queue = MemoryQueue()
        jobs = [job(2, sampler="dpmpp_2m", steps=4, t=i) for i in range(4)]
        for j in jobs:
            await queue.submit(j)
        worker = Worker(queue, {("toy", 1): toy_model("toy")}, Metrics(), static=static)
        await asyncio.wait_for(worker.run(burst=True), 10)
        return [(await queue.result(j.id, 0)).outputs for j in jobs]

    assert asyncio.run(scenario(False)) == asyncio.run(scenario(True))


def test_device_resolution_on_a_cpu_machine():
    import pytest
    import torch

    from service.bootstrap import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(SystemExit, match="sees no GPU"):
        resolve_device("cuda")


def test_start_uses_the_models_own_grid():
    """A consistency model samples on its consistency picks, not a plain Karras grid."""
    from dataclasses import replace

    import torch

    from .conftest import toy_spec

    sampling = replace(
        toy_spec("x").sampling,
        samplers=("cm_multistep",),
        default_sampler="cm_multistep",
        teleport_sigma=None,
    )
    model = toy_model("toy", kind="cm", sampling=sampling)
    active = start(job(1, sampler="cm_multistep", steps=2), model)
    seen = [active.pending[1]]
    seen.append(active.gen.send(torch.zeros_like(active.pending[0]))[1])
    expected = model.spec.grid(2)
    assert seen == expected[:-1].tolist() and seen[1] > 0.01  # not [80, 0.002]


def test_a_lone_job_runs_on_the_event_loop_and_company_sends_passes_to_the_thread():
    """A pass of 5 ms is over inline_compute_ms (2) and well under inline_lone_ms (50 here): a job
    alone runs it on the event loop (no thread hop), two jobs in hand hand it to the
    compute thread so the API can read requests meanwhile."""
    import threading

    from .conftest import slow, toy_stats

    stats = toy_stats()
    threads: list[str] = []
    pass_5ms = slow(stats, 0.005)

    def denoiser(x, sigma, cond):
        threads.append(threading.current_thread().name)
        return pass_5ms(x, sigma, cond)

    async def scenario(jobs):
        queue = MemoryQueue()
        for j in jobs:
            await queue.submit(j)
        model = toy_model("toy", denoiser=denoiser)
        worker = Worker(
            queue, {("toy", 1): model}, Metrics(), inline_lone_ms=50.0, seed_rates=False
        )
        await asyncio.wait_for(worker.run(burst=True), 30)
        return [await queue.result(j.id, 0) for j in jobs]

    results = asyncio.run(scenario([job(steps=6)]))
    assert results[0].state is JobState.SUCCEEDED
    # the first pass has no history and goes to the thread; every later one stays inline
    assert threads[0].startswith("fewstep-compute")
    assert threads[1:] == ["MainThread"] * (len(threads) - 1) and len(threads) >= 5

    threads.clear()
    results = asyncio.run(scenario([job(steps=6, t=1), job(steps=6, t=2)]))
    assert all(r.state is JobState.SUCCEEDED for r in results)
    assert all(t.startswith("fewstep-compute") for t in threads)


def test_the_worker_announces_each_models_engine_speed_before_serving():
    """Row-steps per second of one pass at the model's largest batch (here a model that
    takes 20 ms a pass of up to 16 rows): admission predicts from the first request on."""
    from .conftest import slow, toy_stats

    async def scenario():
        queue = MemoryQueue()
        model = toy_model("toy", denoiser=slow(toy_stats(), 0.02), max_batch_size=16)
        before = await queue.backlog("toy", 1)
        await asyncio.wait_for(Worker(queue, {("toy", 1): model}, Metrics()).run(burst=True), 30)
        return before, await queue.backlog("toy", 1)

    before, after = asyncio.run(scenario())
    assert before.rate is None
    assert 0.3 * 16 / 0.02 <= after.rate <= 16 / 0.02  # a pass never takes less than 20 ms


def test_all_finite_finds_nan_and_inf_in_every_dtype():
    import torch

    from service.worker.scheduler import all_finite

    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        clean = torch.zeros(3, 1, 4, 4, dtype=dtype)
        assert all_finite(clean)
        for bad in (float("nan"), float("inf"), float("-inf")):
            x = clean.clone()
            x[2, 0, 3, 1] = bad
            assert not all_finite(x), (dtype, bad)
    with torch.inference_mode():  # what the worker hands it
        assert not all_finite(torch.full((2, 2), float("nan")) * 1)


def test_metric_children_are_remembered_and_exposed_unchanged():
    from prometheus_client import generate_latest

    metrics = Metrics()
    first = metrics.requests.labels("m", "euler", "200", "images", "anonymous")
    assert metrics.requests.labels("m", "euler", "200", "images", "anonymous") is first
    first.inc()
    metrics.requests.labels(
        model="m", sampler="euler", status="200", endpoint="images", principal="anonymous"
    ).inc()
    text = generate_latest(metrics.registry).decode()
    assert (
        'fewstep_requests_total{endpoint="images",model="m",principal="anonymous",'
        'sampler="euler",status="200"} 2.0' in text
    )


def test_the_serving_process_runs_torch_on_its_configured_threads():
    import torch

    from service.bootstrap import set_threads
    from service.config import Settings

    before = torch.get_num_threads()
    try:
        set_threads(Settings(torch_threads=1))
        assert torch.get_num_threads() == 1
        set_threads(Settings(torch_threads=0))  # 0 leaves torch as it is
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
