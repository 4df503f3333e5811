"""Drain and probes of real processes: `fewstep serve` fails readiness on SIGTERM while it
still serves, then closes and exits 0; `fewstep worker --health-port` reports its loop's
heartbeat, and a stalled loop turns /healthz into 503."""

from __future__ import annotations

import signal
import time
from types import SimpleNamespace

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from service.worker.health import WorkerHealth
from tests.service.redisutil import (
    REDIS_URL,
    Process,
    free_port,
)

from .conftest import wait_for

SMALL = {"FEWSTEP_MODELS": '["fashion-gaussian"]', "FEWSTEP_WARMUP": "false"}
BODY = {"model": "fashion-gaussian", "prompt": "bag", "n": 1, "steps": 2, "sampler": "euler"}


def get(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def grpc_status(port: int, channel: grpc.Channel | None = None) -> int:
    if channel is None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            return grpc_status(port, channel)
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status


def test_sigterm_fails_readiness_first_then_stops_accepting_and_exits_0(tmp_path):
    port, grpc_port = free_port(), free_port()
    env = {**SMALL, "FEWSTEP_DRAIN_DELAY_S": "3"}
    args = ["-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    api = Process([*args, "--grpc-port", str(grpc_port)], tmp_path / "api.log", env)
    url = f"http://127.0.0.1:{port}"
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")  # connected before the signal
    try:
        wait_for(lambda: get(url + "/readyz") == 200, 120, "/readyz")
        assert grpc_status(grpc_port, channel) == health_pb2.HealthCheckResponse.SERVING
        api.signal(signal.SIGTERM)
        begin = time.monotonic()
        wait_for(lambda: get(url + "/readyz") == 503, 2, "/readyz 503 after SIGTERM", 0.01)
        # gRPC health agrees at once: no window in which one probe says ready, the other not
        assert grpc_status(grpc_port, channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        body = httpx.get(url + "/readyz").json()
        assert "shutting down" in body["error"]["message"]
        # still alive and still serving while endpoints drop the pod
        assert get(url + "/healthz") == 200
        done = httpx.post(url + "/v1/images/generations", json=BODY, timeout=10)
        assert done.status_code == 200
        assert grpc_status(grpc_port) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert time.monotonic() - begin < 3  # all of that inside the drain delay
        assert api.wait(20) == 0, api.text()
        assert time.monotonic() - begin >= 3
        assert get(url + "/healthz") is None  # closed
        assert "draining" in api.text()
    finally:
        channel.close()
        api.kill()


def test_sigint_still_stops_at_once(tmp_path):
    port = free_port()
    env = {**SMALL, "FEWSTEP_DRAIN_DELAY_S": "30"}
    args = ["-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--no-grpc"]
    api = Process(args, tmp_path / "api.log", env)
    try:
        wait_for(lambda: get(f"http://127.0.0.1:{port}/readyz") == 200, 120, "/readyz")
        begin = time.monotonic()
        api.signal(signal.SIGINT)
        api.wait(20)
        assert time.monotonic() - begin < 10
    finally:
        api.kill()


def test_worker_health_port_reports_the_loop_and_its_metrics(prefix, tmp_path):
    port = free_port()
    env = {**SMALL, "FEWSTEP_QUEUE": REDIS_URL, "FEWSTEP_REDIS_PREFIX": prefix}
    worker = Process(
        ["-m", "service.cli", "worker", "--health-port", str(port)], tmp_path / "w.log", env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: get(url + "/readyz") == 200, 120, "the worker's /readyz")
        health = httpx.get(url + "/healthz").json()
        assert health["status"] == "ok" and health["last_tick_age_s"] < 5
        metrics = httpx.get(url + "/metrics").text
        assert 'fewstep_model_ready{model="fashion-gaussian"} 1.0' in metrics
        assert get(url + "/nothing") == 404
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        assert get(url + "/healthz") is None
    finally:
        worker.kill()


def test_worker_healthz_is_503_once_the_loop_stalls():
    health = WorkerHealth("127.0.0.1", 0, CollectorRegistry(), stale_s=0.5)
    url = f"http://127.0.0.1:{health.port}"
    try:
        assert (get(url + "/healthz"), get(url + "/readyz")) == (200, 503)  # models loading
        loop = SimpleNamespace(last_tick=time.monotonic())
        health.watch(loop)
        assert (get(url + "/healthz"), get(url + "/readyz")) == (200, 200)
        loop.last_tick -= 2  # no loop pass for two seconds: a hung forward pass
        response = httpx.get(url + "/healthz")
        assert response.status_code == 503 and response.json()["status"] == "stale"
        assert get(url + "/readyz") == 503
    finally:
        health.close()
