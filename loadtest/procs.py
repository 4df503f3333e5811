"""Real fewstep processes for the load tests: started together, ready-checked, stopped."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def machine_check() -> float:
    """Milliseconds a fixed pure-Python workload takes (dict updates and JSON round trips,
    best of 5): how fast this machine runs the interpreter right now. A shared VM's speed
    moves (README's VM ran the service's whole path at half speed for stretches of an
    hour), so runs compare by their ratios, and this says how far apart two runs' machines
    were."""
    text = json.dumps({"a": list(range(500)), "b": "x" * 500})

    def work() -> None:
        d: dict[int, int] = {}
        for i in range(100_000):
            d[i % 1000] = d.get(i % 1000, 0) + i
        for _ in range(500):
            json.loads(text)

    best = float("inf")
    for _ in range(5):
        begin = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - begin)
    return best * 1000


_REQUEST = json.dumps(
    {"model": "fashion-edm", "prompt": "bag", "n": 1, "steps": 1, "sampler": "euler", "seed": 3}
)


def _small_work() -> None:
    """A few microseconds of a request's kind of work: JSON in and out."""
    for _ in range(3):
        json.dumps(json.loads(_REQUEST))


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def cold_curve(waits_ms: list[float], rounds: int = 100) -> list[float]:
    """Microseconds (median) the same small piece of work takes right after this thread
    spun for each of waits_ms. It never sleeps and touches almost no memory meanwhile, so
    where nothing else uses the core's caches the entries would stay level (not measured:
    no such machine was at hand). On the shared VM these benchmarks ran on they grow with
    the wait (2-15x at 8 ms, depending on the hour): the caches are not ours between our
    bursts of work. It is the same effect that makes the service's path at concurrency 1
    slower after a long forward pass (README, "Concurrency 1 with a CPU engine")."""
    medians = []
    for wait in waits_ms:
        spent = []
        for _ in range(rounds):
            _spin(wait / 1000)
            begin = time.perf_counter()
            _small_work()
            spent.append(time.perf_counter() - begin)
        spent.sort()
        medians.append(spent[len(spent) // 2] * 1e6)
    return medians


def cold_check(wait_ms: float = 8.0) -> float:
    """How much slower a small piece of work runs after `wait_ms` of spinning than back to
    back (cold_curve's ratio): 1.0 on a machine whose caches stay ours, 2-15 on the VM
    these benchmarks ran on. It bounds what concurrency 1 can show with a CPU engine whose
    pass takes that long; runs compare where it is close."""
    hot, cold = cold_curve([0.0, wait_ms])
    return cold / hot


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fewstep(*args: str) -> list[str]:
    """The command line of `fewstep ARGS` in this interpreter, quiet."""
    return [sys.executable, "-m", "service.cli", *args, "--log-level", "warning"]


class Processes:
    """Processes serving one URL; ready once GET url + ready_path answers 200."""

    def __init__(
        self,
        commands: list[list[str]],
        port: int,
        env: dict[str, str],
        ready_path: str = "/readyz",
        name: str = "server",
        root: Path = ROOT,
    ) -> None:
        """`root`: the checkout the processes run from (`python -m service.cli` imports the
        `service` package of its working directory first): another one measures a baseline
        side by side."""
        self.port, self.name, self.ready_path = port, name, ready_path
        self.url = f"http://127.0.0.1:{port}"
        self.procs = [subprocess.Popen(c, cwd=root, env={**os.environ, **env}) for c in commands]

    def __enter__(self):
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + self.ready_path).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"{self.name} on {self.url} did not become ready")

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(30)

    def wakeups(self) -> int:
        """Voluntary context switches of every thread of the processes so far: each is a
        thread that blocked and had to be woken (an event-loop wait, a thread hop). Unlike
        wall time, a count other load on the machine does not inflate."""
        total = 0
        for proc in self.procs:
            for status in Path(f"/proc/{proc.pid}/task").glob("*/status"):
                for line in status.read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        return total

    def cpu_seconds(self, first: int = 0) -> float:
        """user + system CPU time so far of the processes from index `first` on (all by
        default; 1 leaves out the first command's, e.g. the API beside its workers)."""
        total = 0
        for proc in self.procs[first:]:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")
