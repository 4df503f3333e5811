"""A real fewstep server on loopback, with one tiny fixture model per failure mode."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import replace

import httpx
import pytest
import torch
import uvicorn

from engines.gaussian import GaussianStats
from engines.repository import LoadedModel, ModelSpec, SamplingSpec
from service.app import create_app
from service.config import Settings

SAMPLERS = ("euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "ddpm", "dpmpp_sde")


def toy_spec(name: str, **changes) -> ModelSpec:
    sampling = SamplingSpec(
        samplers=SAMPLERS,
        default_sampler="dpmpp_2m",
        default_steps=4,
        max_steps=20,
        sigma_min=0.002,
        sigma_max=80.0,
        rho=7.0,
        teleport_sigma=10.0,
        default_guidance=1.0,
        max_guidance=1.0,
    )
    spec = ModelSpec(
        name=name,
        version=1,
        kind="gaussian",
        description="two-class Gaussian toy",
        shape=(1, 4, 4),
        labels=("dark", "light"),
        synonyms={"black": "dark", "white": "light"},
        data_range=(-1.0, 1.0),
        sampling=sampling,
        max_batch_size=64,
        max_n=8,
    )
    return replace(spec, **changes)


def toy_stats() -> GaussianStats:
    g = torch.Generator().manual_seed(0)
    means = torch.stack([torch.full((16,), -0.6), torch.full((16,), 0.6)]).double()
    a = torch.randn(2, 16, 16, generator=g, dtype=torch.float64) * 0.05
    return GaussianStats.from_moments(
        means, a @ a.transpose(1, 2), (1, 4, 4), class_names=("dark", "light")
    )


def toy_model(name: str = "toy", denoiser=None, **spec_changes) -> LoadedModel:
    stats = toy_stats()
    return LoadedModel(
        toy_spec(name, **spec_changes), denoiser or stats.denoiser(), stats, "sha256:toy"
    )


def nan_for_light(stats: GaussianStats):
    """Fixture model whose 'light' rows turn non-finite: such a request must fail alone."""

    def denoiser(x, sigma, cond):
        out = stats.denoise(x, sigma, cond["label"])
        out[cond["label"] == 1] = float("nan")
        return out

    return denoiser


def raises_for_light(stats: GaussianStats):
    """Fixture model that crashes on any batch holding a 'light' row."""

    def denoiser(x, sigma, cond):
        if (cond["label"] == 1).any():
            raise RuntimeError("kernel failure on label 1")
        return stats.denoise(x, sigma, cond["label"])

    return denoiser


def slow(stats: GaussianStats, seconds: float):
    """Fixture model that takes `seconds` per forward pass (for cancel and deadlines)."""

    def denoiser(x, sigma, cond):
        time.sleep(seconds)
        return stats.denoise(x, sigma, cond["label"])

    return denoiser


def elementwise(x, sigma, cond):
    """Fixture denoiser: the posterior mean of a per-class Gaussian (variance 0.25), made of
    elementwise operations only, so a row's x0 is bitwise the same in any batch."""
    s2 = sigma.double().view(-1, 1, 1, 1) ** 2
    mean = torch.where(cond["label"].view(-1, 1, 1, 1) == 1, 0.6, -0.6).double()
    c = 0.25 / (s2 + 0.25)
    return (c * x.double() + (1 - c) * mean).to(x.dtype)


def fixture_models() -> dict:
    stats = toy_stats()
    models = [
        toy_model("toy"),
        toy_model("nan-model", nan_for_light(stats)),
        toy_model("crash-model", raises_for_light(stats)),
        toy_model("slow-model", slow(stats, 0.05)),
        toy_model(
            "tiny-model", max_n=2, sampling=replace(toy_spec("x").sampling, teleport_sigma=None)
        ),
    ]
    return {(m.spec.name, m.spec.version): m for m in models}


class Server:
    """uvicorn serving an app on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise RuntimeError("server did not become ready")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve(models=None, **settings) -> Server:
    settings.setdefault("grpc", False)  # tests/service/test_oip.py turns it on, on loopback
    # Admission by predicted wait refuses from the drain rate it measured, and on a machine
    # busy with other processes one module's burst can measure a rate far below the toy
    # engine's (CI once got a 429 among 32 concurrent requests): tests of something else
    # must not depend on the machine's speed. The admission tests set their own targets.
    settings.setdefault("max_predicted_wait_s", 60.0)
    app = create_app(Settings(warmup=False, **settings), loaded=models or fixture_models())
    return Server(app)


@pytest.fixture(scope="module")
def server():
    with serve() as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c
