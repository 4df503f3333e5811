"""Deployment tests: the images docker/test.sh builds, the rendered manifests, and the
monitoring rules. Tests marked `docker` run containers; their session fixture makes sure the
daemon, the base image and fewstep:cpu exist (docker/test.sh build: cached, a few seconds
when nothing changed) and fails loudly when the daemon cannot start."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "fewstep:cpu"
REDIS_IMAGE = "fewstep-test-redis:bookworm"
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    done = subprocess.run(
        [DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {done.returncode}\n{done.stderr}")
    return done.stdout.strip()


def inspect(name: str, template: str) -> str:
    return docker("inspect", name, "--format", template)


def host_port(name: str, port: int) -> int:
    return int(docker("port", name, str(port)).splitlines()[0].rsplit(":", 1)[1])


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Stack:
    """Containers and a network made by one test, all removed afterwards."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:8]
        self.network = f"fewstep-test-{self.tag}"
        self.names: list[str] = []
        docker("network", "create", self.network)

    def run(self, name: str, *options: str, cmd: tuple[str, ...] = (), image: str = IMAGE) -> str:
        """docker run -d OPTIONS IMAGE CMD on the stack's network; returns the name."""
        full = f"{name}-{self.tag}"
        self.names.append(full)
        docker("run", "-d", "--name", full, "--network", self.network, *options, image, *cmd)
        return full

    def logs(self, name: str) -> str:
        done = subprocess.run([DOCKER, "logs", name], capture_output=True, text=True, check=False)
        return done.stdout + done.stderr

    def close(self) -> None:
        for name in reversed(self.names):
            docker("rm", "-f", "-v", name, check=False)
        docker("network", "rm", self.network, check=False)


@pytest.fixture(scope="session")
def image(pytestconfig) -> str:
    """fewstep:cpu, built by docker/test.sh (which prints its progress and timings)."""
    if not os.environ.get("FEWSTEP_IMAGE_BUILT"):
        capture = pytestconfig.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            done = subprocess.run(["bash", str(ROOT / "docker/test.sh"), "build"], check=False)
        assert done.returncode == 0, "docker/test.sh build failed (its output is above)"
    labels = json.loads(inspect(IMAGE, "{{json .Config.Labels}}"))
    assert labels["org.opencontainers.image.title"] == "fewstep (cpu)"
    return IMAGE


@pytest.fixture
def stack(image):
    made = Stack()
    yield made
    made.close()
