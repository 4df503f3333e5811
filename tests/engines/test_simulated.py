"""The `simulated` runtime (measurement only): its curve interpolates the file, its
forward takes the curve's time and gives zeros of the right shape, samplers stay finite,
and it is chosen only by name."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from engines.runtimes.base import IOSpec, TensorSpec
from engines.runtimes.select import FASTEST_FIRST, RUNTIMES
from engines.runtimes.simulated import LatencyCurve, SimulatedRuntime

IO = IOSpec(
    (
        TensorSpec("x", torch.float32, (1, 28, 28)),
        TensorSpec("c_noise", torch.float32, ()),
        TensorSpec("label", torch.int64, ()),
    ),
    (TensorSpec("out", torch.float32, (1, 28, 28)),),
)


def test_default_curve_is_the_h200_table_and_interpolates():
    curve = LatencyCurve.load()
    assert curve.batches == (1, 8, 32, 128)
    assert curve(1) == pytest.approx(0.996e-3)
    assert curve(128) == pytest.approx(3.465e-3)
    assert curve(20) == pytest.approx((1.167e-3 + 1.759e-3) / 2)
    # beyond the last point it grows along the last segment
    assert curve(224) == pytest.approx(3.465e-3 + (3.465e-3 - 1.759e-3))


def test_a_curve_file_replaces_the_default(tmp_path):
    path = tmp_path / "gpu.json"
    path.write_text('{"seconds": {"4": 0.002, "1": 0.001}}')
    curve = LatencyCurve.load(path)
    assert curve.batches == (1, 4) and curve(2) == pytest.approx(0.001 + 0.001 / 3)
    path.write_text('{"seconds": {"1": -1}}')
    with pytest.raises(ValueError, match="positive"):
        LatencyCurve.load(path)


def test_forward_takes_the_curves_time_and_returns_finite_zeros():
    curve = LatencyCurve((1, 64), (0.004, 0.012))
    runtime = SimulatedRuntime(IO, curve)
    for rows, want in ((1, 0.004), (64, 0.012), (32, curve(32))):
        inputs = IO.random(rows, torch.Generator().manual_seed(0), label_high=10)
        times = []
        for _ in range(5):
            begin = time.perf_counter()
            out = runtime.forward(inputs)["out"]
            times.append(time.perf_counter() - begin)
        # never shorter than the curve; a busy machine may add a little
        assert want <= statistics.median(times) <= want * 1.3 + 0.002
        assert out.shape == (rows, 1, 28, 28) and torch.isfinite(out).all() and not out.any()


def test_simulated_is_chosen_only_by_name():
    assert "simulated" in RUNTIMES and "simulated" not in FASTEST_FIRST
