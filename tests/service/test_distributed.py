"""The HTTP API in distributed mode: an API process without a worker and a worker process,
both over the fixture models, sharing the real Redis (own key prefix). The tests of
test_api.py that hold across processes run here unchanged (imported below, so they use this
module's `server`); then what only distributed mode has."""

from __future__ import annotations

import signal
import time
from types import SimpleNamespace

import httpx
import pytest

from .conftest import serve
from .redisutil import (
    REDIS_URL,
    Process,
    delete_prefix,
    free_port,
    new_prefix,
    require_redis,
    wait_ready,
)
from .test_api import (  # noqa: F401 - collected here, against the distributed server
    test_a_non_finite_request_fails_alone,
    test_an_engine_crash_fails_only_the_culprit,
    test_cancel_a_running_job,
    test_deadline_expires_mid_run_and_before_compute,
    test_idempotency_key_returns_the_same_job,
    test_job_api_and_server_sent_events,
    test_light_and_dark_classes_look_different,
    test_models_health_and_metrics,
    test_openai_sdk_generates_pngs,
    test_same_seed_same_bytes_alone_and_under_concurrent_load,
    test_step_events_carry_previews_when_asked,
    test_unknown_jobs_and_routes,
)
from .test_capacity import refuses_by_predicted_wait_and_unmeetable_deadline


def fixture_api(env: dict, log) -> tuple[Process, str]:
    port = free_port()
    proc = Process(["-m", "tests.service.fixture_proc", "api", str(port)], log, env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return proc, url


def fixture_worker(env: dict, log) -> Process:
    proc = Process(["-m", "tests.service.fixture_proc", "worker"], log, env)
    proc.wait_for_log("ready")
    return proc


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_redis()
    folder = tmp_path_factory.mktemp("distributed")
    prefix = new_prefix()
    env = {"FEWSTEP_QUEUE": REDIS_URL, "FEWSTEP_REDIS_PREFIX": prefix}
    worker = Process(["-m", "tests.service.fixture_proc", "worker"], folder / "worker.log", env)
    api = None
    try:
        api, url = fixture_api(env, folder / "api.log")
        worker.wait_for_log("ready")
        yield SimpleNamespace(url=url, prefix=prefix)
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.text()
        if api is not None:
            api.kill()
        delete_prefix(prefix)


def test_predicted_wait_admission_across_processes(tmp_path):
    """The API learns the drain rate from the worker's completions over Redis."""
    require_redis()
    prefix = new_prefix()
    env = {
        "FEWSTEP_QUEUE": REDIS_URL,
        "FEWSTEP_REDIS_PREFIX": prefix,
        "FEWSTEP_MAX_PREDICTED_WAIT_S": "0.3",
        "FEWSTEP_MAX_QUEUED_SAMPLES": "2000",
    }
    api, url = fixture_api(env, tmp_path / "api.log")
    worker = fixture_worker(env, tmp_path / "worker.log")
    try:
        refuses_by_predicted_wait_and_unmeetable_deadline(url)
    finally:
        worker.signal(signal.SIGTERM)
        worker.wait(60)
        api.kill()
        delete_prefix(prefix)


def test_admission_position_and_backlog_metrics_across_processes(tmp_path):
    """No worker yet: the API queues, reports positions and the backlog, refuses beyond the
    bound with 429 + Retry-After; a worker started later runs everything."""
    require_redis()
    prefix = new_prefix()
    env = {
        "FEWSTEP_QUEUE": REDIS_URL,
        "FEWSTEP_REDIS_PREFIX": prefix,
        "FEWSTEP_MAX_QUEUED_SAMPLES": "6",
    }
    api, url = fixture_api(env, tmp_path / "api.log")
    worker = None
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            body = {"model": "toy", "prompt": "dark", "n": 2, "steps": 3}
            ids = [c.post("/v1/jobs", json=body).json()["id"] for _ in range(3)]
            positions = [c.get(f"/v1/jobs/{i}").json()["position"] for i in ids]
            assert positions == [0, 1, 2]
            refused = c.post("/v1/jobs", json=body)
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            assert "queue holds 6 samples (limit 6)" in refused.json()["error"]["message"]
            metrics = c.get("/metrics").text
            assert "fewstep_queue_depth 3.0" in metrics and "fewstep_queue_lag 6.0" in metrics
            full = 'fewstep_rejected_total{principal="anonymous",reason="queue_full"}'
            assert f"{full} 1.0" in metrics
            worker = fixture_worker(env, tmp_path / "worker.log")
            for i in ids:
                assert c.get(f"/v1/jobs/{i}/result", params={"wait": 30}).status_code == 200
            assert "fewstep_queue_depth 0.0" in c.get("/metrics").text
    finally:
        if worker is not None:
            worker.signal(signal.SIGTERM)
            worker.wait(30)
        api.kill()
        delete_prefix(prefix)


def test_an_api_without_weights_leaves_speech_frames_to_the_worker(tmp_path):
    """An API-only process bounds speech by Festival's phones alone; the 21-minute request
    passes that bound, and the worker refuses it when it starts, before any sampling: the
    client still gets a 400 saying what to change, quickly."""
    require_redis()
    prefix = new_prefix()
    env = {"FEWSTEP_QUEUE": REDIS_URL, "FEWSTEP_REDIS_PREFIX": prefix, "FEWSTEP_TEST_SPEECH": "1"}
    api, url = fixture_api(env, tmp_path / "api.log")
    worker = fixture_worker(env, tmp_path / "worker.log")
    body = {"model": "speech-tiny", "response_format": "wav", "seed": 1}
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.post("/v1/audio/speech", json={**body, "input": "Hello there."}).is_success
            text = "Go. " * 15 + " ".join(["the quick brown fox jumps over the lazy dog,"] * 40)
            begin = time.perf_counter()
            r = c.post("/v1/audio/speech", json={**body, "input": text + ".", "speed": 0.25})
            took = time.perf_counter() - begin
        assert r.status_code == 400, r.text
        assert "s of audio, over model speech-tiny's limit" in r.json()["error"]["message"]
        assert took < 5, f"refused after {took:.1f} s"
    finally:
        worker.signal(signal.SIGTERM)
        worker.wait(30)
        api.kill()
        delete_prefix(prefix)


def test_a_job_waits_for_a_worker_that_serves_its_model(tmp_path):
    """A worker claims only the models it loaded; another model's job stays queued for the
    worker that has it."""
    require_redis()
    prefix = new_prefix()
    env = {"FEWSTEP_QUEUE": REDIS_URL, "FEWSTEP_REDIS_PREFIX": prefix}
    api, url = fixture_api(env, tmp_path / "api.log")
    toy_only = fixture_worker({**env, "FEWSTEP_MODELS": '["toy"]'}, tmp_path / "w1.log")
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            toy = c.post("/v1/jobs", json={"model": "toy", "prompt": "dark"}).json()["id"]
            tiny = c.post("/v1/jobs", json={"model": "tiny-model", "prompt": "dark"}).json()["id"]
            assert c.get(f"/v1/jobs/{toy}/result", params={"wait": 30}).status_code == 200
            time.sleep(0.3)
            assert c.get(f"/v1/jobs/{tiny}").json()["status"] == "queued"
    finally:
        toy_only.signal(signal.SIGTERM)
        toy_only.wait(30)
        api.kill()
        delete_prefix(prefix)


def test_serve_with_its_own_worker_on_a_shared_queue():
    """`fewstep serve --queue redis://...` (no --no-worker): API and worker in one process,
    on the shared queue, so further workers can join it."""
    require_redis()
    prefix = new_prefix()
    try:
        with (
            serve(queue=REDIS_URL, redis_prefix=prefix) as server,
            httpx.Client(base_url=server.url, timeout=30) as c,
        ):
            r = c.post("/v1/images/generations", json={"model": "toy", "prompt": "light", "n": 2})
            assert r.status_code == 200 and len(r.json()["data"]) == 2
            job = c.post("/v1/jobs", json={"model": "toy", "prompt": "dark"}).json()
            assert c.get(f"/v1/jobs/{job['id']}/result", params={"wait": 30}).status_code == 200
    finally:
        delete_prefix(prefix)
