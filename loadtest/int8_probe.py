"""INT8 probe: how much faster ONNX Runtime static INT8 makes fashion-edm on this CPU, and
its error by sigma band (the runtime `onnxruntime-int8`, engines/runtimes/quantize.py,
applies the same recipe and gates its build on the overall x0 error).

    .venv/bin/python loadtest/int8_probe.py [--model fashion-edm] [--seconds 1]

It quantizes the model's cached fp32 ONNX export (`fewstep build MODEL` makes it) with
`onnxruntime.quantization.quantize_static`: QDQ format, convolutions only (int8 weights
per channel, uint8 activations), the first and last convolution kept in fp32, activation
ranges calibrated (percentile) on real Fashion-MNIST training images
(/usr/share/datasets/fashion-mnist) noised at log-uniform sigma in [0.002, 80] and
preconditioned as the EDM denoiser does (c_in, c_noise = ln(sigma) / 4, 10% null labels).
It prints rows/s of fp32 and INT8 on one thread at batch 1, 8, 32, interleaved, and the
error of INT8 against fp32 on held-out noised test images, both of the network output F
and of the denoiser's x0 = c_skip x + c_out F (what a sampler sees), by sigma band.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engines.data import load_fashion_mnist  # noqa: E402
from engines.repository import Repository  # noqa: E402


def noised(images, labels, rows: int, seed: int, sigma_data: float, null: int) -> dict:
    """Network inputs for noised real images, as EDMDenoiser feeds them; plus sigma."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(images), rows, replace=False)
    y = images[idx]
    sigma = np.exp(rng.uniform(np.log(0.002), np.log(80.0), rows)).astype(np.float32)
    x = y + sigma[:, None, None, None] * rng.standard_normal(y.shape).astype(np.float32)
    c_in = 1 / np.sqrt(sigma**2 + sigma_data**2)
    label = labels[idx].astype(np.int64)
    label[rng.random(rows) < 0.1] = null
    feeds = {
        "x": (x * c_in[:, None, None, None]).astype(np.float32),
        "c_noise": (np.log(sigma) / 4).astype(np.float32),
        "label": label,
    }
    return {"feeds": feeds, "sigma": sigma}


def main() -> int:
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

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fashion-edm")
    parser.add_argument("--seconds", type=float, default=1.0, help="per runtime and batch")
    parser.add_argument("--calibration", type=int, default=256, help="calibration rows")
    args = parser.parse_args()

    spec = Repository(ROOT / "model_repo").spec(args.model)
    if spec.kind != "edm":
        raise SystemExit(f"{args.model} is a {spec.kind!r} model; this probe knows EDM only")
    fp32 = sorted(
        Path.home().glob(f".cache/fewstep/engines/{spec.name}@{spec.version}/*/model.onnx")
    )
    if not fp32:
        raise SystemExit(f"no ONNX export of {args.model}: run `fewstep build {args.model}`")
    train_x, train_y = (t.numpy() for t in load_fashion_mnist("train"))
    test_x, test_y = (t.numpy() for t in load_fashion_mnist("test"))
    null, sd = spec.network.classes, spec.sigma_data

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            batches = [
                noised(train_x, train_y, 16, seed, sd, null)["feeds"]
                for seed in range(max(1, args.calibration // 16))
            ]
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre, int8 = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        print("quantizing (calibration on Fashion-MNIST train) ...", file=sys.stderr)
        quant_pre_process(str(fp32[-1]), str(pre))
        convs = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"]
        quantize_static(
            str(pre), str(int8), Reader(),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile, op_types_to_quantize=["Conv"],
            nodes_to_exclude=[convs[0], convs[-1]],
        )  # fmt: skip
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sessions = {
            name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for name, path in (("fp32", fp32[-1]), ("int8", int8))
        }
        held = noised(test_x, test_y, 256, 12345, sd, null)
        f = {n: s.run(None, held["feeds"])[0] for n, s in sessions.items()}
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(2):  # interleaved rounds
            for batch in (1, 8, 32):
                feeds = {k: v[:batch] for k, v in held["feeds"].items()}
                for name, session in sessions.items():
                    session.run(None, feeds)
                    count, begin = 0, time.perf_counter()
                    while time.perf_counter() - begin < args.seconds:
                        session.run(None, feeds)
                        count += 1
                    times.setdefault((name, batch), []).append(
                        (time.perf_counter() - begin) / count
                    )
    print(f"# INT8 probe: {args.model}, ONNX Runtime {ort.__version__}, one thread\n")
    print("| batch | fp32 rows/s | int8 rows/s | int8 / fp32 |\n|---|---|---|---|")
    for batch in (1, 8, 32):
        a, b = min(times["fp32", batch]), min(times["int8", batch])
        print(f"| {batch} | {batch / a:.0f} | {batch / b:.0f} | {a / b:.2f}x |")
    sigma = held["sigma"]
    c_out = (sigma * sd / np.sqrt(sigma**2 + sd**2))[:, None, None, None]
    err_f = np.abs(f["int8"] - f["fp32"])
    err_x0 = err_f * c_out
    print("\n| sigma | rows | max abs F | mean abs F | max abs x0 | mean abs x0 |")
    print("|---|---|---|---|---|---|")
    for lo, hi in ((0.002, 0.1), (0.1, 1.0), (1.0, 10.0), (10.0, 80.0), (0.002, 80.0)):
        m = (sigma >= lo) & (sigma < hi + 1e-6)
        print(
            f"| {lo:g}-{hi:g} | {m.sum()} | {err_f[m].max():.3f} | {err_f[m].mean():.4f} | "
            f"{err_x0[m].max():.4f} | {err_x0[m].mean():.5f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
