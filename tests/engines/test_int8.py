"""`onnxruntime-int8`: calibrated on real Fashion-MNIST, refused when it moves x0 more than
its bounds or loses more than its bounds in FD and class accuracy, chosen only by name, and
served only once its quality gate passed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engines import quality_gate as gate
from engines.data import fashion_root
from engines.quality import Cell
from engines.repository import Repository
from engines.runtimes import quantize as q
from engines.runtimes.base import RuntimeUnavailable
from engines.runtimes.export import BuildError
from engines.runtimes.select import FASTEST_FIRST, RUNTIMES, onnx_artifact, prepare

ROOT = Path(__file__).parents[2] / "model_repo"


@pytest.fixture(scope="module")
def ctx():
    if not fashion_root().exists():  # a Debian package (dataset-fashion-mnist)
        pytest.skip(f"Fashion-MNIST not installed at {fashion_root()}")
    return Repository(ROOT).engine_context(
        "fashion-edm", progress=lambda m: None, threads=1, ungated_int8=True
    )


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


def _int8_folder(ctx) -> Path:
    prepare("onnxruntime-int8", ctx)  # built (x0-gated) if missing
    (folder,) = (ctx.cache.root / ctx.model).glob("onnx-int8-*")
    return folder


def test_serving_loads_only_an_int8_artifact_that_passed_its_quality_gate(ctx):
    folder = _int8_folder(ctx)
    serving = replace(ctx, ungated_int8=False)
    q.record_gate(folder, {"passed": False, "verdict": "FD 9.000 over the bound 0.500"})
    with pytest.raises(RuntimeUnavailable, match=r"failed its quality gate \(FD 9.000"):
        prepare("onnxruntime-int8", serving)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest[q.GATE_KEY]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeUnavailable, match="fewstep build fashion-edm --runtime onnxrun"):
        prepare("onnxruntime-int8", serving)
    q.record_gate(folder, {"passed": True, "verdict": "ok"})
    assert prepare("onnxruntime-int8", serving).name == "onnxruntime-int8"
    # the manifest's sha256 covers the model file only: the verdict leaves it intact
    assert ctx.cache.check(folder, "model.onnx") is None


def _cell(fd: float, accuracy: float) -> Cell:
    return Cell("fashion-edm", "dpmpp_2m", 10, 10, False, 1.0, 1000, fd, accuracy, 100.0)


def test_the_gate_bounds_fd_and_accuracy_against_fp32():
    base = _cell(0.20, 0.90)
    fd_bound = gate.FD_MAX_RATIO * 0.20 + gate.FD_SLACK
    assert gate.GateVerdict.judge(base, _cell(fd_bound - 1e-3, 0.90 - 0.019)).passed
    worse_fd = gate.GateVerdict.judge(base, _cell(fd_bound + 1e-3, 0.91))
    assert not worse_fd.passed and "FD" in worse_fd.verdict
    worse_acc = gate.GateVerdict.judge(base, _cell(0.20, 0.90 - 0.021))
    assert not worse_acc.passed and "class accuracy" in worse_acc.verdict
    assert "REFUSED" in worse_acc.text()


@pytest.mark.slow
def test_a_refused_candidate_is_recorded_and_never_served(ctx, monkeypatch):
    """The real gate, at a small n and with a bound nothing meets: it measures both
    networks, writes the refusal into the manifest, and serving then skips INT8."""
    _int8_folder(ctx)
    monkeypatch.setattr(gate, "FD_MAX_RATIO", 0.0)
    monkeypatch.setattr(gate, "FD_SLACK", -1.0)
    repo = Repository(ROOT)
    with pytest.raises(BuildError, match="REFUSED") as refused:
        gate.gate_int8(repo, "fashion-edm", n=40, cache=ctx.cache, progress=lambda m: None)
    assert "n=40" in str(refused.value)
    model = repo.load("fashion-edm", cache=ctx.cache, runtimes=["onnxruntime-int8"])
    assert model.runtime == "torch"  # the fallback: INT8 was skipped
    (reason,) = [r for n, r in model.engine.skipped if n == "onnxruntime-int8"]
    assert "failed its quality gate" in reason
