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
