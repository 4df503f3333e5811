"""`onnxruntime-int8`: the ONNX export quantized to INT8, calibrated on real data, gated
by its error in what a sampler sees.

ONNX Runtime static quantization (QDQ): convolutions only, int8 weights per output
channel, uint8 activations whose ranges are calibrated (percentile) on noised real
Fashion-MNIST training images fed as the model's denoiser feeds its network; the first
and last convolution stay fp32. The check runs fp32 and INT8 on noised test images and
weighs the network's error by c_out, the factor the denoiser puts on it: the x0 a sampler
receives may differ by at most X0_MAX_ERROR (max abs) and X0_MEAN_ERROR (mean abs) on the
[-1, 1] scale, or the artifact is refused. Only EDM pixel models have a calibration
recipe (`Calibration.for_spec` says which). Lossy, so never chosen by default: a model
asks for it by name in model.yaml's `runtimes`.

The x0 check bounds the network's error, not what it does to images. A second gate,
engines/quality_gate.py (run by `fewstep build MODEL --runtime onnxruntime-int8`), samples
the model with fp32 and INT8 and compares FD and class accuracy; its verdict is written
into the artifact's manifest (`quality_gate`), and serving loads only an artifact that
passed it (`gate_refusal`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.runtimes.base import RuntimeUnavailable

X0_MAX_ERROR = 0.25  # about 32 8-bit levels, anywhere in any image at any sigma
X0_MEAN_ERROR = 0.01  # about 1.3 8-bit levels on average
SIGMA_RANGE = (0.002, 80.0)
GATE_KEY = "quality_gate"  # the manifest entry the quality gate writes


@dataclass(frozen=True)
class Calibration:
    """How an EDM denoiser feeds its network, to draw network inputs from real images."""

    sigma_data: float
    null_label: int  # the unconditional label (classifier-free guidance)

    @classmethod
    def for_spec(cls, spec) -> Calibration | None:
        if spec.kind != "edm" or spec.autoencoder is not None or spec.network is None:
            return None  # no recipe (consistency, latent and speech models)
        return cls(float(spec.sigma_data), spec.network.classes)

    def draw(self, split: str, rows: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Network inputs for `rows` noised real images, and each row's c_out."""
        from engines.data import load_fashion_mnist

        try:
            images, labels = (t.numpy() for t in load_fashion_mnist(split))
        except (OSError, ValueError) as err:
            raise RuntimeUnavailable(f"INT8 calibration needs Fashion-MNIST: {err}") from err
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(images), rows, replace=False)
        lo, hi = (math.log(s) for s in SIGMA_RANGE)
        sigma = np.exp(rng.uniform(lo, hi, rows)).astype(np.float32)
        noise = rng.standard_normal(images[idx].shape).astype(np.float32)
        x = images[idx] + sigma[:, None, None, None] * noise
        scale = np.sqrt(sigma**2 + self.sigma_data**2)
        label = labels[idx].astype(np.int64)
        label[rng.random(rows) < 0.1] = self.null_label
        feeds = {
            "x": (x / scale[:, None, None, None]).astype(np.float32),
            "c_noise": (np.log(sigma) / 4).astype(np.float32),
            "label": label,
        }
        return feeds, sigma * self.sigma_data / scale


def quantize(fp32: Path, out: Path, calibration: Calibration, rows: int = 256) -> dict:
    """Write the INT8 model of `fp32` to `out` and return its measured x0 errors; raises
    ValueError when they are over the bounds."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration.draw("train", 16, s)[0] for s in range(rows // 16))

        def get_next(self):
            return next(self.batches, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    convs = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"]
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.Percentile,
        op_types_to_quantize=["Conv"],
        nodes_to_exclude=[convs[0], convs[-1]],
    )
    pre.unlink()
    feeds, c_out = calibration.draw("test", rows, 12345)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    outputs = [
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(
            None, feeds
        )[0]
        for path in (fp32, out)
    ]
    x0 = np.abs(outputs[1] - outputs[0]) * c_out[:, None, None, None]
    errors = {"x0_max_abs_error": float(x0.max()), "x0_mean_abs_error": float(x0.mean())}
    if x0.max() > X0_MAX_ERROR or x0.mean() > X0_MEAN_ERROR:
        raise ValueError(
            f"INT8 moves x0 by up to {x0.max():.3f} (mean {x0.mean():.4f}); the bounds are "
            f"{X0_MAX_ERROR} and {X0_MEAN_ERROR}"
        )
    return errors


def gate_refusal(cache, folder: Path) -> str | None:
    """None when the INT8 artifact in `folder` of `cache` (an EngineCache) is intact and
    passed its quality gate; else why it may not be served."""
    reason = cache.check(folder, "model.onnx")
    if reason is not None:
        return f"no INT8 artifact that passed its quality gate ({reason})"
    gate = json.loads((folder / "manifest.json").read_text()).get(GATE_KEY)
    if gate is None:
        return "the INT8 artifact has not been through its quality gate"
    if not gate.get("passed"):
        return f"the INT8 artifact failed its quality gate ({gate.get('verdict')})"
    return None


def record_gate(folder: Path, verdict: dict) -> None:
    """Write the quality gate's verdict into the artifact's manifest (its sha256 covers the
    model file only, so the artifact stays intact)."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest[GATE_KEY] = verdict
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(manifest, indent=2) + "\n")
    staging.replace(path)
