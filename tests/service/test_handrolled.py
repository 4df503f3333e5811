"""The servers `loadtest/stages.py --idle` measures beside fewstep (loadtest/handrolled.py)
answer the request the load generator sends, report the pass they slept, and refuse a bad
body the way their framework does, so the comparison stays a comparison."""

from __future__ import annotations

import json
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


def test_a_bad_forward_pass_is_refused_with_the_usage():
    import subprocess

    script = str(ROOT / "loadtest" / "handrolled.py")
    for forward in ("fast", "-1", "onnx2"):
        done = subprocess.run([sys.executable, script, "asgi", "1", forward], capture_output=True)
        assert done.returncode == 2 and b"FORWARD_MS|onnx" in done.stderr, done.stderr


@pytest.mark.parametrize("kind", ["fastapi", "asgi", "floor"])
def test_with_onnx_the_pass_is_the_real_network(kind):
    """`onnx`: the pass is fashion-edm's denoiser on ONNX Runtime. The hand-rolled
    endpoint's image is that network's x0 from the seed's noise, not the noise itself."""
    import base64
    import io

    import numpy as np
    import torch
    from PIL import Image

    from loadtest.handrolled import Network

    port = free_port()
    cmd = [sys.executable, str(ROOT / "loadtest" / "handrolled.py"), kind, str(port), "onnx"]
    body = dict(BODY, n=1, seed=11)
    with Processes([cmd], port, {}, name=kind) as server:
        client = RawClient(server.url)
        try:
            outcome = client.send(body)
            status, data = client.request(
                "POST", "/v1/images/generations", json.dumps(body).encode()
            )
        finally:
            client.close()
    assert outcome.status == status == 200 and outcome.samples == 1
    assert 0 < outcome.forward < outcome.latency
    if kind != "fastapi":
        return
    png = base64.b64decode(json.loads(data)["data"][0]["b64_json"])
    served = np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)
    noise = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(11))

    def pixels(x: torch.Tensor) -> np.ndarray:
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()[0, 0]

    x0, _ = Network()(noise)
    assert np.abs(served - pixels(x0)).max() <= 1  # the network's x0 (threads may round)
    assert (served != pixels(noise)).mean() > 0.5  # and not the noise the sleep returns
