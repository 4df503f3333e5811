"""Redis for the tests: the shared server at 127.0.0.1:6379 (own key prefix per test, keys
deleted afterwards), private redis-server processes for fault tests, and fewstep processes
(API, workers) on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import redis

REDIS_URL = os.environ.get("FEWSTEP_TEST_REDIS", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parents[2]


def new_prefix() -> str:
    return f"fewstep-test-{uuid.uuid4().hex[:12]}:"


def require_redis(url: str = REDIS_URL) -> None:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        raise RuntimeError(
            f"the Redis tests need a Redis at {url} ({exc}); `bash tests/run.sh` starts one"
        ) from exc


def delete_prefix(prefix: str, url: str = REDIS_URL) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server on a free loopback port, append-only file in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is missing: apt-get install redis-server")
        self.proc = subprocess.Popen(
            [
                *(binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""),
                *("--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return self
            except redis.BusyLoadingError:
                pass
            except redis.ConnectionError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        """Shut down as an operator would (SIGTERM: the append-only file is complete)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Process:
    """A fewstep process (API or worker) with its output in a log file."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None) -> None:
        self.log = log
        self.handle = open(log, "ab")  # noqa: SIM115 - closed in wait()/kill()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, stdout=self.handle, stderr=subprocess.STDOUT,
            env=full_env,
        )  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited {self.proc.returncode}:\n{self.text()}")
            time.sleep(0.05)
        raise RuntimeError(f"{needle!r} not logged within {timeout} s:\n{self.text()}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        self.handle.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()


def api_process(queue: str, prefix: str, log: Path, *extra: str, env=None) -> tuple[Process, str]:
    """`fewstep serve --no-worker` on the shipped model repository; returns it and its URL."""
    port = free_port()
    args = ["-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--no-grpc", "--queue", queue, "--no-worker", "--log-level", "warning", *extra]
    proc = Process(args, log, {"FEWSTEP_REDIS_PREFIX": prefix, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return proc, url


def wait_ready(url: str, proc: Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.proc.returncode}:\n{proc.text()}")
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready:\n{proc.text()}")
