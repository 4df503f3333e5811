"""`onnxruntime-int8`: calibrated on real Fashion-MNIST, refused when it moves x0 more than
its bounds, chosen only by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engines.data import fashion_root
from engines.repository import Repository
from engines.runtimes import quantize as q
from engines.runtimes.select import FASTEST_FIRST, RUNTIMES, onnx_artifact, prepare

ROOT = Path(__file__).parents[2] / "model_repo"


@pytest.fixture(scope="module")
def ctx():
    if not fashion_root().exists():  # a Debian package (dataset-fashion-mnist)
        pytest.skip(f"Fashion-MNIST not installed at {fashion_root()}")
    return Repository(ROOT).engine_context("fashion-edm", progress=lambda m: None, threads=1)


def test_calibration_recipe_for_edm_pixel_models_only():
    repo = Repository(ROOT)
    assert q.Calibration.for_spec(repo.spec("fashion-edm")) == q.Calibration(0.5, 10)
    assert q.Calibration.for_spec(repo.spec("fashion-cd")) is None  # consistency model
    assert q.Calibration.for_spec(repo.spec("fashion-latent-edm")) is None  # latent
    assert "onnxruntime-int8" in RUNTIMES and "onnxruntime-int8" not in FASTEST_FIRST


def test_int8_runtime_is_gated_by_its_x0_error(ctx):
    runtime = prepare("onnxruntime-int8", ctx)
    assert (runtime.name, runtime.precision, runtime.device) == ("onnxruntime-int8", "int8", "cpu")
    inputs = ctx.io.random(4, torch.Generator().manual_seed(0), label_high=11)
    out = runtime.forward(inputs)["out"]
    assert out.shape == (4, 1, 28, 28) and torch.isfinite(out).all()
    folders = list((ctx.cache.root / ctx.model).glob("onnx-int8-*/manifest.json"))
    manifest = json.loads(folders[-1].read_text())
    assert manifest["x0_max_abs_error"] <= q.X0_MAX_ERROR
    assert manifest["x0_mean_abs_error"] <= q.X0_MEAN_ERROR


def test_a_quantization_over_the_bound_is_refused(ctx, tmp_path, monkeypatch):
    monkeypatch.setattr(q, "X0_MAX_ERROR", 1e-6)
    fp32 = onnx_artifact(ctx).path
    with pytest.raises(ValueError, match="INT8 moves x0 by up to"):
        q.quantize(fp32, tmp_path / "int8.onnx", ctx.calibration, rows=32)
