"""Faults in distributed mode, with real processes and a real Redis: a worker killed with
SIGKILL mid-batch, a worker stopped with SIGTERM, Redis away for a few seconds, a poison job
that kills every worker that runs it, an API process restarted under its clients, and a
Redis primary demoted to a replica (a failover) under a running server."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import signal
import time

import httpx
import pytest
import redis
from PIL import Image

from service.queue.keys import GROUP, Keys

from .conftest import serve
from .redisutil import (
    REDIS_URL,
    Process,
    RedisServer,
    api_process,
    free_port,
)
from .test_distributed import fixture_api, fixture_worker

# these tests submit bursts to fault the workers under them, not to test admission: a
# predicted-wait target nothing reaches keeps every submission in (a loaded machine's
# engine-speed estimate would otherwise refuse the tail of a burst)
NO_WAIT_TARGET = "3600"
SLOW = {"model": "slow-model", "prompt": "dark", "sampler": "euler"}  # 50 ms per pass


def event_types(client: redis.Redis, keys: Keys, job_id: str) -> list[str]:
    return [fields["type"] for _, fields in client.xrange(keys.events(job_id))]


def held_by(client: redis.Redis, stream: str, pid: int) -> int:
    """Entries the worker process `pid` holds (its consumer's pending count)."""
    if not client.exists(stream):
        return 0
    consumers = client.xinfo_consumers(stream, GROUP)
    return sum(c["pending"] for c in consumers if f":{pid}:" in c["name"])


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def stop(*procs: Process) -> None:
    for proc in procs:
        if proc is not None and proc.proc.poll() is None:
            proc.signal(signal.SIGTERM)
    for proc in procs:
        if proc is not None:
            try:
                proc.wait(30)
            except Exception:
                proc.kill()


def test_1_kill_9_mid_batch_loses_nothing_and_writes_each_result_once(prefix, tmp_path):
    env = {
        "FEWSTEP_QUEUE": REDIS_URL,
        "FEWSTEP_REDIS_PREFIX": prefix,
        "FEWSTEP_CLAIM_TIMEOUT_S": "1.5",
        "FEWSTEP_MAX_PREDICTED_WAIT_S": NO_WAIT_TARGET,
        "FEWSTEP_MAX_ACTIVE_SAMPLES": "16",
    }
    keys, client = Keys(prefix), redis.Redis.from_url(REDIS_URL, decode_responses=True)
    stream = keys.stream("slow-model@1", 0)
    api, url = fixture_api(env, tmp_path / "api.log")
    doomed = fixture_worker(env, tmp_path / "doomed.log")
    survivor = fixture_worker(env, tmp_path / "survivor.log")
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            ids = [c.post("/v1/jobs", json={**SLOW, "steps": 8}).json()["id"] for _ in range(60)]
            wait_until(lambda: held_by(client, stream, doomed.proc.pid) > 0, 20, "a claim")
            time.sleep(0.15)  # a few forward passes into its batch
            lost = held_by(client, stream, doomed.proc.pid)
            doomed.proc.kill()
            doomed.wait()
            assert lost > 0
            codes = [c.get(f"/v1/jobs/{i}/result", params={"wait": 60}).status_code for i in ids]
        assert codes == [200] * 60
        events = [event_types(client, keys, i) for i in ids]
        # each result was stored exactly once (one terminal event, written with it)
        assert all(e.count("succeeded") == 1 and e[-1] == "succeeded" for e in events)
        redelivered = [e for e in events if e.count("started") == 2]
        assert len(redelivered) >= lost  # the killed worker's jobs ran again elsewhere
        assert client.xpending(stream, GROUP)["pending"] == 0
        assert client.xlen(keys.dead) == 0
        assert client.hget(keys.counters, "jobs") == "0"
    finally:
        stop(survivor, doomed)
        api.kill()


def test_2_sigterm_finishes_the_jobs_in_hand_and_redelivers_nothing(prefix, tmp_path):
    env = {
        "FEWSTEP_QUEUE": REDIS_URL,
        "FEWSTEP_REDIS_PREFIX": prefix,
        "FEWSTEP_MAX_ACTIVE_SAMPLES": "8",
        "FEWSTEP_MAX_PREDICTED_WAIT_S": NO_WAIT_TARGET,
    }
    keys, client = Keys(prefix), redis.Redis.from_url(REDIS_URL, decode_responses=True)
    stream = keys.stream("slow-model@1", 0)
    api, url = fixture_api(env, tmp_path / "api.log")
    first = fixture_worker(env, tmp_path / "first.log")
    second = None
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            ids = [c.post("/v1/jobs", json={**SLOW, "steps": 20}).json()["id"] for _ in range(16)]
            wait_until(lambda: held_by(client, stream, first.proc.pid) == 8, 20, "8 claims")
            first.signal(signal.SIGTERM)
            assert first.wait(30) == 0
            assert "SIGTERM: no new jobs; finishing 8 in hand" in first.text()
            states = [c.get(f"/v1/jobs/{i}").json()["status"] for i in ids]
            assert states.count("succeeded") == 8 and states.count("queued") == 8
            assert client.xpending(stream, GROUP)["pending"] == 0  # all acknowledged
            names = [x["name"] for x in client.xinfo_consumers(stream, GROUP)]
            assert not any(f":{first.proc.pid}:" in n for n in names)  # left the group
            second = fixture_worker(env, tmp_path / "second.log")
            for i in ids:
                assert c.get(f"/v1/jobs/{i}/result", params={"wait": 60}).status_code == 200
        assert all(event_types(client, keys, i).count("started") == 1 for i in ids)
    finally:
        stop(second, first)
        api.kill()


def test_3_redis_away_answers_503_then_recovers_without_losing_jobs(tmp_path):
    with RedisServer(tmp_path) as server:
        env = {
            "FEWSTEP_QUEUE": server.url,
            "FEWSTEP_REDIS_TIMEOUT_S": "0.5",
            "FEWSTEP_CLAIM_TIMEOUT_S": "10",
            "FEWSTEP_MAX_PREDICTED_WAIT_S": NO_WAIT_TARGET,
        }
        api, url = fixture_api(env, tmp_path / "api.log")
        worker = fixture_worker(env, tmp_path / "worker.log")
        pool = concurrent.futures.ThreadPoolExecutor(1)
        try:
            with httpx.Client(base_url=url, timeout=60) as c:
                slow_job = {**SLOW, "steps": 20}
                ids = [c.post("/v1/jobs", json=slow_job).json()["id"] for _ in range(4)]
                waiting = pool.submit(
                    httpx.post, url + "/v1/images/generations", json={**SLOW, "steps": 20},
                    timeout=90,
                )  # fmt: skip
                time.sleep(0.3)
                server.stop()
                for method, path, body in [
                    ("POST", "/v1/jobs", SLOW),
                    ("POST", "/v1/images/generations", SLOW),
                    ("GET", f"/v1/jobs/{ids[0]}", None),
                ]:
                    begin = time.monotonic()
                    r = c.request(method, path, json=body)
                    assert time.monotonic() - begin < 3, "a request hung on the missing Redis"
                    assert r.status_code == 503, r.text
                    assert int(r.headers["retry-after"]) >= 1
                    assert "queue (Redis) is unavailable" in r.json()["error"]["message"]
                assert c.get("/healthz").status_code == 200
                assert c.get("/metrics").status_code == 200
                time.sleep(2)
                server.start()
                for i in ids:
                    assert c.get(f"/v1/jobs/{i}/result", params={"wait": 60}).status_code == 200
                assert waiting.result(90).status_code == 200
                new = c.post("/v1/jobs", json={**SLOW, "steps": 2})
                assert new.status_code == 202
                result = c.get(f"/v1/jobs/{new.json()['id']}/result", params={"wait": 60})
                assert result.status_code == 200
        finally:
            pool.shutdown(wait=False)
            stop(worker)
            api.kill()


@pytest.mark.slow
def test_4_a_poison_job_is_dead_lettered_and_its_neighbours_complete(prefix, tmp_path):
    """poison-model's forward pass kills its worker (SIGKILL) whenever a 'light' row is in
    the batch. After max_deliveries the job goes to the dead-letter stream with a failed
    result; the 'dark' jobs claimed with it finish on their last try, alone."""
    env = {
        "FEWSTEP_QUEUE": REDIS_URL,
        "FEWSTEP_REDIS_PREFIX": prefix,
        "FEWSTEP_CLAIM_TIMEOUT_S": "1",
        "FEWSTEP_MAX_PREDICTED_WAIT_S": NO_WAIT_TARGET,
        "FEWSTEP_MAX_DELIVERIES": "3",
        "FEWSTEP_MODELS": '["poison-model"]',
    }
    keys, client = Keys(prefix), redis.Redis.from_url(REDIS_URL, decode_responses=True)
    api, url = fixture_api(env, tmp_path / "api.log")
    workers: list[Process] = []
    deaths = 0
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            job = {"model": "poison-model", "steps": 3, "sampler": "euler"}
            poison = c.post("/v1/jobs", json={**job, "prompt": "light"}).json()["id"]
            dark = {**job, "prompt": "dark"}
            fine = [c.post("/v1/jobs", json=dark).json()["id"] for _ in range(4)]
            for k in range(2):
                workers.append(fixture_worker(env, tmp_path / f"worker-{k}.log"))

            def all_done() -> bool:
                nonlocal deaths
                for k, w in enumerate(workers):
                    if w.proc.poll() is not None:  # a supervisor restarts dead workers
                        deaths += 1
                        w.wait()
                        workers[k] = Process(
                            ["-m", "tests.service.fixture_proc", "worker"],
                            tmp_path / f"worker-{k}.log",
                            env,
                        )
                return all(client.exists(keys.result(i)) for i in [poison, *fine])

            wait_until(all_done, 90, "every job to get its result")
            failed = c.get(f"/v1/jobs/{poison}/result")
            assert failed.status_code == 422
            assert "delivered 3 times" in failed.json()["error"]["message"]
            for i in fine:
                assert c.get(f"/v1/jobs/{i}/result").status_code == 200
        assert deaths == 3  # the poison job killed exactly max_deliveries workers
        (dead,) = client.xrange(keys.dead)
        assert dead[1]["id"] == poison and dead[1]["deliveries"] == "3"
    finally:
        stop(*workers)
        api.kill()


def test_5_an_api_restart_loses_no_accepted_job(prefix, tmp_path):
    """The real CLIs on the shipped model: jobs accepted by one API process (no worker is
    running yet) are answered by its successor after a SIGKILL."""
    env = {"FEWSTEP_MODELS": '["fashion-gaussian"]'}
    first, url = api_process(REDIS_URL, prefix, tmp_path / "api-1.log", env=env)
    body = {"model": "fashion-gaussian", "prompt": "sneaker", "n": 2, "steps": 4}
    with httpx.Client(base_url=url, timeout=30) as c:
        ids = [c.post("/v1/jobs", json={**body, "seed": s}).json()["id"] for s in range(5)]
        keyed = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "restart-1"})
        assert keyed.status_code == 202
    first.kill()
    worker = Process(
        ["-m", "service.cli", "worker", "--queue", REDIS_URL, "--log-level", "info"],
        tmp_path / "worker.log",
        {"FEWSTEP_REDIS_PREFIX": prefix, **env},
    )
    second = None
    try:
        second, url = api_process(REDIS_URL, prefix, tmp_path / "api-2.log", env=env)
        worker.wait_for_log("ready")
        with httpx.Client(base_url=url, timeout=60) as c:
            for i in ids:
                r = c.get(f"/v1/jobs/{i}/result", params={"wait": 60})
                assert r.status_code == 200, r.text
                png = base64.b64decode(r.json()["data"][0]["b64_json"])
                assert Image.open(io.BytesIO(png)).size == (28, 28)
            again = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "restart-1"})
            assert again.status_code == 200 and again.json()["id"] == keyed.json()["id"]
            events = c.get(f"/v1/jobs/{ids[0]}/events").text
            assert "event: queued" in events and events.rstrip().split("\n")[-2].endswith(
                "succeeded"
            )
    finally:
        stop(worker)
        if second is not None:
            second.kill()


def test_6_a_read_only_redis_during_failover_is_a_503_not_a_500(tmp_path):
    """A replica being promoted answers writes with READONLY: Redis is not there yet for
    writes, so the API answers 503 with Retry-After (as when Redis is away), keeps
    answering /readyz from reads, and serves again once the replica is a primary."""
    with RedisServer(tmp_path) as server, serve(queue=server.url) as api:
        client = redis.Redis.from_url(server.url)
        body = {"model": "toy", "prompt": "dark", "steps": 2}
        with httpx.Client(base_url=api.url, timeout=30) as c:
            assert c.post("/v1/images/generations", json=body).status_code == 200
            client.replicaof("127.0.0.1", free_port())  # a replica of a primary not yet up
            try:
                messages = []
                for path in ("/v1/images/generations", "/v1/jobs", "/v1/jobs"):
                    r = c.post(path, json=body)
                    assert r.status_code == 503, r.text
                    assert int(r.headers["retry-after"]) >= 1
                    messages.append(r.json()["error"]["message"])
                    assert "queue (Redis) is unavailable" in messages[-1]
                # the role change closes the connections it had; then writes are refused
                assert any("read only replica" in m for m in messages), messages
                assert c.get("/readyz").status_code == 200  # reads still answer
            finally:
                client.replicaof("NO", "ONE")
            r = c.post("/v1/images/generations", json=body)
            assert r.status_code == 200, r.text
