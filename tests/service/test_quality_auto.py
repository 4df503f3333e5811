"""Quality "auto": admission picks the most steps of the model's budgets whose predicted
finish (the wait for the work ahead, then one forward pass per step) meets the request's
deadline at the current load; it never picks more steps than that prediction allows, falls
to fewer steps under load instead of refusing, and refuses (429) only when not even the
fewest steps fit. model.yaml's `quality_steps` is checked strictly."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from engines.repository import Repository, RepositoryError
from service import capacity
from service.config import Settings
from service.errors import DeadlineUnmeetable
from service.queue.backlog import Backlog

from .conftest import fixture_models, serve, slow, toy_model, toy_spec, toy_stats
from .test_queue import job

ROOT = Path(__file__).resolve().parents[2]


def auto_job(n: int, budgets: tuple[int, ...], deadline: float, priority: int = 0):
    j = job(n=n, priority=priority)
    j.sampler, j.steps, j.step_budgets = "euler", budgets[0], list(budgets)
    j.cost, j.deadline = n * budgets[0], deadline
    return j


def finish(backlog: Backlog, j, steps: int, batch: int) -> float:
    return capacity.predicted_wait(backlog, j.priority) + capacity.own_seconds(
        backlog, j, steps, batch
    )


def test_picks_the_most_steps_whose_predicted_finish_meets_the_deadline():
    backlog = Backlog({0: 1000}, rate=1000.0)  # 1 s of work ahead
    # n=2, batch 64: a pass carries 64 rows (the work ahead fills it): 0.064 s per step
    predicted = {s: 1.0 + s * 0.064 for s in (8, 4, 2, 1)}
    for s in (8, 4, 2, 1):
        j = auto_job(2, (8, 4, 2, 1), deadline=100.0)
        assert finish(backlog, j, s, 64) == pytest.approx(predicted[s])

    def greedy(deadline: float) -> int:
        return capacity.choose_steps(backlog, auto_job(2, (8, 4, 2, 1), deadline), 100, 64, False)

    assert greedy(102.0) == 8 and greedy(101.3) == 4 and greedy(101.07) == 1
    with pytest.raises(DeadlineUnmeetable) as info:
        capacity.choose_steps(backlog, auto_job(2, (8, 4, 2, 1), 101.0), 100.0, 64)
    assert info.value.status == 429 and "even at 1 step" in info.value.message
    assert info.value.retry_after == pytest.approx(0.064, rel=0.01)


def test_graded_keeps_headroom_for_the_larger_budgets():
    backlog = Backlog({0: 1000}, rate=1000.0)  # as above: finish 1 s + s x 0.064 s

    def graded(deadline: float) -> int:
        return capacity.choose_steps(backlog, auto_job(2, (8, 4, 2, 1), deadline), 100, 64)

    # budget i of 4 must finish within (i + 1) / 4 of the time left
    assert graded(106.1) == 8  # 1.512 <= 6.1 / 4
    assert graded(106.0) == 4  # 1.512 > 6.0 / 4; 1.256 <= 6.0 / 2
    assert graded(102.6) == 4 and graded(102.5) == 2  # 1.256 vs 2.6 / 2, 2.5 / 2
    assert graded(101.1) == 1  # 1.064 <= 1.1; 1.128 > 1.1 x 3 / 4
    with pytest.raises(DeadlineUnmeetable):  # the fewest steps get the whole time left
        graded(101.0)


def test_idle_and_unmeasured_get_the_most_steps():
    j = auto_job(2, (8, 4, 2, 1), deadline=100.5)
    assert capacity.choose_steps(Backlog({}, rate=None), j, 100.0, 64) == 8
    # nothing ahead: a pass holds the job's own rows only, 8 steps x 2 rows / 1000 per s
    assert capacity.own_seconds(Backlog({}, rate=1000.0), j, 8, 64) == pytest.approx(0.016)
    assert capacity.choose_steps(Backlog({}, rate=1000.0), j, 100.0, 64) == 8


def test_never_more_steps_than_the_prediction_allows():
    rng = random.Random(0)
    budgets = (10, 8, 5, 4, 3, 2, 1)
    for _ in range(2000):
        work = {0: rng.randrange(0, 5000), 1: rng.randrange(0, 500)}
        backlog = Backlog(work, rng.uniform(50, 5e4))
        deadline = 100.0 + rng.uniform(0.001, 3.0)
        j = auto_job(rng.randint(1, 16), budgets, deadline, rng.randint(0, 1))
        batch, graded = rng.choice((1, 8, 64, 256)), rng.random() < 0.5
        left = j.deadline - 100.0

        def allowed(i: int, left: float = left, graded: bool = graded) -> float:
            return left * ((i + 1) / len(budgets) if graded else 1.0)

        try:
            chosen = capacity.choose_steps(backlog, j, 100.0, batch, graded)
        except DeadlineUnmeetable:
            assert finish(backlog, j, budgets[-1], batch) > left
            continue
        assert finish(backlog, j, chosen, batch) <= allowed(budgets.index(chosen)) <= left
        for i, s in enumerate(budgets[: budgets.index(chosen)]):
            assert finish(backlog, j, s, batch) > allowed(i)


def test_check_sets_steps_and_cost_of_an_auto_job():
    class Queue:
        async def backlog(self, model, version):
            return Backlog({0: 1000}, rate=1000.0)

    j = auto_job(2, (8, 4, 2, 1), deadline=time.time() + 3.0)  # graded: 4 steps
    j.cost = 2 * 8 * 2  # a two-evaluation sampler would double it; stays linear in steps
    asyncio.run(capacity.check(Queue(), Settings(), j, 64))
    assert j.steps == 4 and j.cost == 2 * 4 * 2


def test_budgets_cap_at_the_requests_steps_and_the_samplers_minimum():
    s = replace(toy_spec("t").sampling, quality_steps=(8, 4, 2, 1))
    assert s.budgets("euler") == (8, 4, 2, 1)
    assert s.budgets("euler", 3) == (3, 2, 1)  # the client's steps are the most it wants
    assert s.budgets("euler", 4) == (4, 2, 1)
    assert s.budgets("dpmpp_3m") == (8, 4, 2, 1)[: len(s.budgets("dpmpp_3m"))]
    assert replace(s, quality_steps=()).budgets("euler") == (4,)  # default steps only
    assert s.budgets("heun", 1) == (1,)


@pytest.mark.parametrize(
    "value, message",
    [
        ("[4, 2, 1]", None),
        ("[1, 2, 4]", None),  # any order: kept largest first
        ("4", "a non-empty list of distinct integers in 1..max_steps (8)"),
        ("[]", "a non-empty list"),
        ("[4, 4, 2]", "distinct"),
        ("[16, 2]", "1..max_steps (8)"),
        ("[0, 2]", "1..max_steps (8)"),
        ("[2.5]", "integers"),
        ("[true]", "integers"),
    ],
)
def test_quality_steps_is_validated_strictly(tmp_path, value, message):
    src = ROOT / "model_repo" / "fashion-cd"
    dst = tmp_path / "fashion-cd"
    dst.mkdir()
    for version in (p for p in src.iterdir() if p.is_dir()):
        (dst / version.name).symlink_to(version, target_is_directory=True)
    text = (src / "model.yaml").read_text()
    before = text.index("  quality_steps:")
    end = text.index("\n", before)
    (dst / "model.yaml").write_text(text[:before] + f"  quality_steps: {value}" + text[end:])
    if message is None:
        assert Repository(tmp_path).spec("fashion-cd").sampling.quality_steps == (4, 2, 1)
        return
    with pytest.raises(RepositoryError) as info:
        Repository(tmp_path).spec("fashion-cd")
    assert "model.yaml: sampling.quality_steps must be" in str(info.value)
    assert message in str(info.value)


def auto_models() -> dict:
    models = fixture_models()
    sampling = replace(toy_spec("x").sampling, quality_steps=(8, 4, 2, 1))
    model = toy_model("auto-model", slow(toy_stats(), 0.02), sampling=sampling)
    models[("auto-model", 1)] = model
    return models


@pytest.fixture(scope="module")
def auto_server():
    with serve(auto_models()) as s:
        yield s


BODY = {"model": "auto-model", "prompt": "dark", "n": 2, "sampler": "euler"}


def test_auto_needs_a_deadline_and_a_known_value(auto_server):
    with httpx.Client(base_url=auto_server.url, timeout=30) as c:
        r = c.post("/v1/images/generations", json={**BODY, "quality": "auto"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "deadline_ms" and "send deadline_ms" in err["message"]
        r = c.post("/v1/images/generations", json={**BODY, "quality": "best"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "quality"
        r = c.post(
            "/v2/models/auto-model/infer",
            json={
                "inputs": [{"name": "label", "shape": [1], "datatype": "BYTES", "data": ["dark"]}],
                "parameters": {"quality": "auto"},
            },
        )
        assert r.status_code == 400 and "'timeout' parameter" in r.json()["error"]


def test_auto_at_idle_gets_the_most_steps_and_is_reported(auto_server):
    with httpx.Client(base_url=auto_server.url, timeout=30) as c:
        body = {**BODY, "quality": "auto", "deadline_ms": 20_000}
        r = c.post("/v1/images/generations", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["quality"] == "auto" and out["steps"] == 8 and out["nfe"] == 8
        r = c.post("/v1/images/generations", json={**body, "steps": 3})
        assert r.json()["steps"] == 3  # the request's own steps are the most it wants
        fixed = c.post("/v1/images/generations", json=BODY).json()
        assert fixed["quality"] == "fixed" and fixed["steps"] == 4  # the default steps
        model = c.get("/v1/models/auto-model").json()
        assert model["quality_steps"] == [8, 4, 2, 1]
        metrics = c.get("/metrics").text
        assert 'fewstep_auto_steps_count{model="auto-model"} 2.0' in metrics
        assert 'fewstep_auto_steps_sum{model="auto-model"} 11.0' in metrics
        r = c.post(
            "/v2/models/auto-model/infer",
            json={
                "inputs": [{"name": "label", "shape": [1], "datatype": "BYTES", "data": ["dark"]}],
                "parameters": {"quality": "auto", "timeout": 20_000_000},
            },
        )
        assert r.status_code == 200, r.text
        params = r.json()["parameters"]
        assert params["quality"] == "auto" and params["steps"] == 8


def test_under_load_auto_falls_to_fewer_steps_then_refuses(auto_server):
    state = auto_server.app.state.fewstep

    async def loaded(model, version):  # 1 s of work ahead at 1000 row-steps/s
        return Backlog({0: 1000}, rate=1000.0)

    real = state.queue.backlog
    state.queue.backlog = loaded
    # no rate known in-process: a fixed request's bound is checked against the backlog
    # read (the loaded one), not by the queue against its own, empty, books
    state.queue.drain_rate = lambda model, version: None
    try:
        with httpx.Client(base_url=auto_server.url, timeout=30) as c:
            body = {**BODY, "quality": "auto"}
            # predicted: 1 s + s x 0.064 s; graded, budget i of 4 gets (i + 1) / 4 of the
            # deadline: 3 s allows 4 steps (1.26 s <= 1.5 s; 8 steps: 1.51 s > 0.75 s)
            r = c.post("/v1/images/generations", json={**body, "deadline_ms": 3000})
            assert r.status_code == 200, r.text
            assert r.json()["steps"] == 4 and r.json()["quality"] == "auto"
            r = c.post("/v1/jobs", json={**body, "deadline_ms": 1100})
            assert r.status_code == 202 and r.json()["steps"] == 1
            assert r.json()["quality"] == "auto"
            r = c.post("/v1/images/generations", json={**body, "deadline_ms": 900})
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "deadline_unmeetable"
            assert int(r.headers["retry-after"]) >= 1
            # a fixed request with the same deadline is refused the same way
            r = c.post("/v1/images/generations", json={**BODY, "deadline_ms": 900})
            assert r.status_code == 429
    finally:
        state.queue.backlog = real
        del state.queue.drain_rate
