"""docker/compose.yaml, brought up for real with Debian's docker-compose on the images
docker/test.sh built (Redis from the test Redis image): Redis with its append-only file,
the API and two workers whose HEALTHCHECKs turn healthy, jobs completed through them, and
`stop` draining every worker to exit 0. The `monitoring` and `gpu` profiles stay off (no
image can be pulled here)."""

from __future__ import annotations

import os
import subprocess
import uuid

import httpx
import pytest

from tests.service.redisutil import free_port

from .conftest import REDIS_IMAGE, ROOT, docker, inspect, wait_for

pytestmark = pytest.mark.docker


@pytest.fixture
def compose(image):
    project = f"fewstep-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {
        **os.environ,
        "FEWSTEP_IMAGE": image,
        "REDIS_IMAGE": REDIS_IMAGE,
        "FEWSTEP_HTTP_PORT": str(port),
        "FEWSTEP_GRPC_PORT": str(free_port()),
        "FEWSTEP_MODELS": '["fashion-gaussian"]',
    }

    def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        command = ["docker-compose", "-p", project, "-f", str(ROOT / "docker/compose.yaml")]
        return subprocess.run(
            [*command, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )

    try:
        yield run, f"http://127.0.0.1:{port}"
    finally:
        run("down", "-v", "-t", "5")


def health(container: str) -> str:
    return inspect(container, "{{.State.Health.Status}}")


def test_compose_stack_serves_and_its_workers_drain_to_exit_0(compose):
    run, url = compose
    up = run("up", "-d", "--no-build", "--scale", "worker=2")
    assert up.returncode == 0, up.stderr
    workers = run("ps", "-q", "worker").stdout.split()
    assert len(workers) == 2
    redis = run("ps", "-q", "redis").stdout.strip()
    appendonly = docker("exec", redis, "redis-cli", "config", "get", "appendonly").split()
    assert appendonly == ["appendonly", "yes"]

    def ready() -> bool:
        try:
            return httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 120, "the compose API")
    for worker in workers:  # the image's HEALTHCHECK, on the worker's health port
        wait_for(lambda w=worker: health(w) == "healthy", 90, f"worker {worker} healthy")
    body = {"model": "fashion-gaussian", "prompt": "coat", "n": 2, "steps": 4}
    with httpx.Client(base_url=url, timeout=60) as client:
        codes = [client.post("/v1/images/generations", json=body).status_code for _ in range(10)]
    assert codes == [200] * 10
    stop = run("stop", "-t", "60", "worker")
    assert stop.returncode == 0, stop.stderr
    assert [inspect(w, "{{.State.ExitCode}}") for w in workers] == ["0", "0"]
