"""The service on a model whose network runs on ONNX Runtime: same pixels as torch, and
/v1/models and /metrics name the runtime."""

import base64
import io
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from engines.repository import Repository
from tests.service.conftest import serve

ROOT = Path(__file__).parents[2] / "model_repo"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server():
    repo = Repository(ROOT)
    ort = repo.load("fashion-cd", progress=lambda m: None)  # as model.yaml asks
    eager = repo.load("fashion-cd", runtimes=["torch"])
    eager = replace(eager, spec=replace(eager.spec, name="fashion-cd-torch"))
    version = ort.spec.version
    with serve({("fashion-cd", version): ort, ("fashion-cd-torch", version): eager}) as s:
        yield s


def pixels(client: httpx.Client, model: str) -> np.ndarray:
    body = {"model": model, "prompt": "sneaker", "n": 3, "seed": 11, "response_format": "b64_json"}
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    return np.stack(
        [
            np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))), dtype=int)
            for item in response.json()["data"]
        ]
    )


def test_onnxruntime_serves_the_same_images_as_torch(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        ort, eager = pixels(client, "fashion-cd"), pixels(client, "fashion-cd-torch")
    assert ort.shape == (3, 28, 28) and ort.std() > 10  # images, not a flat field
    assert np.abs(ort - eager).max() <= 1  # one 8-bit level, as across batch sizes


def test_models_and_metrics_name_the_runtime(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        metrics = client.get("/metrics").text
    runtime = models["fashion-cd"]["runtime"]
    assert runtime["name"] == "onnxruntime" and runtime["precision"] == "fp32"
    assert runtime["device"] == "cpu"
    skipped = [s["runtime"] for s in runtime["skipped"]]
    assert skipped == ["tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "torch-cudagraphs"]
    assert models["fashion-cd-torch"]["runtime"]["name"] == "torch"
    assert 'fewstep_model_runtime_info{model="fashion-cd",runtime="onnxruntime"} 1.0' in metrics
    assert 'fewstep_model_runtime_info{model="fashion-cd-torch",runtime="torch"} 1.0' in metrics


def test_simulated_runtime_serves_and_is_labelled_everywhere(tmp_path):
    """`fewstep serve --runtime simulated`: the network never runs, every forward sleeps for
    the curve's time; /v1/models and /metrics say `simulated`, and samplers stay finite."""
    from service.app import create_app
    from service.config import Settings
    from tests.service.conftest import Server

    curve = tmp_path / "curve.yaml"
    curve.write_text("seconds: {1: 0.01, 256: 0.02}\n")
    settings = Settings(
        model_repo=str(ROOT),
        models=["fashion-edm"],
        runtime="simulated",
        latency_curve=str(curve),
        warmup=False,
        grpc=False,
    )
    with Server(create_app(settings)) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        body = {"model": "fashion-edm", "prompt": "bag", "n": 2, "steps": 4, "seed": 1}
        r = c.post("/v1/images/generations", json={**body, "response_format": "b64_json"})
        assert r.status_code == 200, r.text
        runtime = {m["id"]: m for m in c.get("/v1/models").json()["data"]}["fashion-edm"]
        metrics = c.get("/metrics").text
    assert runtime["runtime"]["name"] == "simulated"
    assert 'fewstep_model_runtime_info{model="fashion-edm",runtime="simulated"} 1.0' in metrics
    assert 'runtime="simulated"' in metrics.split("fewstep_forward_seconds_count", 1)[1][:200]
    for item in r.json()["data"]:
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))
        assert image.shape == (28, 28)  # a decoded image (zero network output: meaningless)
