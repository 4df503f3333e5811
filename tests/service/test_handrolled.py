"""The servers `loadtest/stages.py --idle` measures beside fewstep (loadtest/handrolled.py)
answer the request the load generator sends, report the pass they slept, and refuse a bad
body the way their framework does, so the comparison stays a comparison."""

from __future__ import annotations

import sys

import pytest

from loadtest.procs import ROOT, Processes, free_port
from loadtest.rawclient import RawClient

BODY = {"model": "fashion-edm", "prompt": "bag", "n": 2, "steps": 1, "sampler": "euler"}


@pytest.mark.parametrize("kind", ["fastapi", "asgi", "floor"])
def test_answers_like_fewstep_and_reports_the_pass(kind):
    port = free_port()
    cmd = [sys.executable, str(ROOT / "loadtest" / "handrolled.py"), kind, str(port), "3"]
    with Processes([cmd], port, {}, name=kind) as server:
        client = RawClient(server.url)
        try:
            outcomes = [client.send(dict(BODY, seed=seed)) for seed in range(5)]
            if kind == "fastapi":
                status, _ = client.request("POST", "/v1/images/generations", b'{"n": "x"}')
                assert status == 422
        finally:
            client.close()
    for outcome in outcomes:
        assert outcome.status == 200 and outcome.samples == 2
        assert 0.003 <= outcome.forward < outcome.latency


def test_an_unknown_server_is_refused():
    import subprocess

    script = str(ROOT / "loadtest" / "handrolled.py")
    done = subprocess.run([sys.executable, script, "triton", "1", "1"], capture_output=True)
    assert done.returncode == 2 and b"expected fastapi, asgi or floor" in done.stderr
