"""`fewstep serve` as a real process on the shipped model: the README's first command."""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from PIL import Image


@pytest.fixture(scope="module")
def served():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--grpc-port", "0"]  # gRPC on (as by default) but on a free port
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("fewstep serve did not become ready: " + (proc.stdout.read() or ""))
    yield url, proc
    if proc.poll() is None:
        proc.kill()


def test_openai_sdk_speaks_with_the_shipped_speech_models(served):
    url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    for model in ("speech-prodiff", "speech-comospeech"):
        response = client.audio.speech.create(
            model=model,
            voice="alloy",
            input="Dr. Smith paid $42 for 3 books.",
            response_format="wav",
            speed=1.0,
            extra_body={"seed": 5},
        )
        audio, rate = sf.read(io.BytesIO(response.content))
        assert rate == 22050 and 1.5 < len(audio) / rate < 6
        assert np.abs(audio).max() > 0.1
    with pytest.raises(openai.BadRequestError, match="input is empty"):
        client.audio.speech.create(model="speech-prodiff", voice="alloy", input="")


def test_openai_sdk_against_the_shipped_model(served):
    url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    response = client.images.generate(
        model="fashion-gaussian", prompt="Sneakers", n=2, size="28x28", response_format="b64_json"
    )
    assert len(response.data) == 2
    for item in response.data:
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.size == (28, 28) and image.mode == "L"
        assert item.revised_prompt == "sneaker"
    models = httpx.get(url + "/v1/models").json()["data"]
    gaussian = next(m for m in models if m["id"] == "fashion-gaussian")
    assert gaussian["teleport"] is True and gaussian["size"] == "28x28"


def test_models_name_the_runtime_each_shipped_model_loaded_on(served):
    url, _ = served
    models = {m["id"]: m["runtime"] for m in httpx.get(url + "/v1/models").json()["data"]}
    assert models["fashion-gaussian"]["name"] == "torch" and models["fashion-gaussian"]["note"]
    networks = {"fashion-edm", "fashion-cd", "fashion-latent-edm", "fashion-lcm"}
    assert networks <= set(models)
    for name in networks:  # model.yaml: tensorrt, ..., onnxruntime, torch
        assert models[name]["name"] == "onnxruntime" and models[name]["device"] == "cpu"
        assert models[name]["skipped"][0]["runtime"] == "tensorrt"
    metrics = httpx.get(url + "/metrics").text
    assert 'fewstep_model_runtime_info{model="fashion-gaussian",runtime="torch"} 1.0' in metrics
    assert 'fewstep_model_runtime_info{model="fashion-lcm",runtime="onnxruntime"} 1.0' in metrics


@pytest.mark.parametrize("model", ["fashion-cd", "fashion-lcm"])
def test_trained_models_serve_recognisable_images(served, model):
    """The consistency student, and the latent one whose samples the worker decodes to
    pixels: the shipped classifier recognises what was asked for."""
    import numpy as np
    import torch

    from engines import quality
    from engines.data import FASHION_LABELS

    url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    asked = ["trouser", "bag", "sneaker", "ankle boot"]
    pixels = []
    for i, prompt in enumerate(asked):
        data = client.images.generate(
            model=model, prompt=prompt, n=2, response_format="b64_json", extra_body={"seed": i}
        ).data
        for item in data:
            image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
            assert image.size == (28, 28) and image.mode == "L"
            pixels.append(np.asarray(image, dtype=np.float32) / 127.5 - 1)
    classifier = quality.load_classifier(Path(__file__).parents[2] / quality.CLASSIFIER)
    _, preds = quality.embed(classifier, torch.from_numpy(np.stack(pixels))[:, None])
    labels = [FASHION_LABELS.index(p) for p in asked for _ in range(2)]
    assert (preds == torch.tensor(labels)).float().mean() >= 0.75


def test_openai_sdk_surfaces_a_clear_error(served):
    url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="is not a class of model fashion-gaussian"):
        client.images.generate(model="fashion-gaussian", prompt="a red car")
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.images.generate(model="dall-e-3", prompt="sneaker")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) missing")
def test_promtool_accepts_the_metrics(served):
    url, _ = served
    httpx.post(url + "/v1/images/generations", json={"prompt": "bag", "teleport": True}, timeout=30)
    text = httpx.get(url + "/metrics").text
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_sigterm_shuts_down_gracefully(served):
    """uvicorn drains, runs the lifespan shutdown (worker stops claiming, finishes what it
    holds), then re-raises SIGTERM so the exit status says why the process ended."""
    url, proc = served
    httpx.post(url + "/v1/jobs", json={"prompt": "coat", "steps": 20})
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) in (0, -signal.SIGTERM)
    log = proc.stdout.read()
    assert "Application shutdown complete" in log, log


def test_serve_refuses_a_broken_repository(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.yaml").write_text("name: bad\n")
    env = {**os.environ}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--model-repo",
            str(tmp_path),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2 and "no version folder" in proc.stderr
