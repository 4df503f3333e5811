"""Runtimes: input checks, buckets, preference and fallback, model.yaml fields, TensorRT's
pure-Python parts (TensorRT itself cannot be installed here)."""

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from engines.repository import Repository, RepositoryError
from engines.runtimes import select as selection
from engines.runtimes.base import (
    RuntimeInputError,
    RuntimeNet,
    RuntimeUnavailable,
    batch_buckets,
    bucket_for,
)
from engines.runtimes.export import EngineCache, network_io
from engines.runtimes.onnx_rt import tensorrt_ep_options
from engines.runtimes.tensorrt_rt import plan_key_fields, profile_shapes
from tests.engines.test_repository import DELETE, rewrite

ROOT = Path(__file__).parents[2] / "model_repo"
pytestmark = pytest.mark.usefixtures("one_torch_thread")
NO_TENSORRT = (
    "tensorrt Python package not installed; it installs only from NVIDIA's index, unreachable here"
)


@pytest.fixture(scope="module")
def repo():
    return Repository(ROOT)


@pytest.fixture
def ctx(repo, tmp_path):
    return repo.engine_context("fashion-cd", cache=EngineCache(tmp_path), progress=lambda m: None)


def test_buckets_cover_every_batch_up_to_the_model_limit():
    assert batch_buckets(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert batch_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100) and batch_buckets(1) == (1,)
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(RuntimeInputError, match="over the largest bucket"):
        bucket_for(9, (1, 2, 4, 8))


def test_the_network_io_names_every_conditioning_input(repo):
    io = network_io(repo.spec("fashion-edm"))
    assert io.input_names == ["x", "c_noise", "label"] and io.output_names == ["out"]
    assert io.inputs[0].shape(5) == (5, 1, 28, 28) and io.inputs[2].dtype == torch.int64


def test_inputs_are_checked_before_running(ctx):
    runtime = selection.prepare("torch", ctx)
    good = runtime.io.random(3, torch.Generator().manual_seed(0), label_high=11)
    assert runtime.forward(good)["out"].shape == (3, 1, 28, 28)
    cases = [
        ({k: v for k, v in good.items() if k != "label"}, r"missing \['label'\]"),
        ({**good, "mask": good["c_noise"]}, r"unexpected \['mask'\]"),
        ({**good, "label": good["label"].float()}, "'label' must be a torch.int64 tensor"),
        ({**good, "c_noise": good["c_noise"][:2]}, r"'c_noise' must have shape \['batch'\]"),
        ({**good, "x": good["x"][:, :, :27]}, r"'x' must have shape \['batch', 1, 28, 28\]"),
    ]
    for inputs, message in cases:
        with pytest.raises(RuntimeInputError, match=message):
            runtime.forward(inputs)


def test_runtime_net_fills_the_null_label_and_ignores_what_the_network_does_not_take(ctx):
    runtime = selection.prepare("torch", ctx)
    net = RuntimeNet(runtime, null_label=10)
    x, c = torch.randn(2, 1, 28, 28), torch.randn(2)
    unconditional = net(x, c, None)
    explicit = net(x, c, {"label": torch.full((2,), 10), "guidance_scale": torch.ones(2)})
    assert torch.equal(unconditional, explicit)


def test_the_first_runtime_that_loads_runs_and_the_others_say_why_not(ctx):
    choice = selection.select(list(selection.RUNTIMES), ctx)
    assert choice.runtime.name == "onnxruntime"
    reasons = dict(choice.skipped)
    assert list(reasons) == [
        "tensorrt",
        "onnxruntime-tensorrt",
        "onnxruntime-cuda",
        "torch-cudagraphs",
    ]
    if importlib.util.find_spec("tensorrt") is None:
        assert reasons["tensorrt"].startswith("tensorrt Python package not installed")
    for name in ("onnxruntime-tensorrt", "onnxruntime-cuda"):
        assert (
            "ExecutionProvider needs a GPU (device cuda); the model loads on cpu" in reasons[name]
        )
    assert "CUDA graphs need the network on a GPU" in reasons["torch-cudagraphs"]
    described = choice.describe()
    assert described["name"] == "onnxruntime" and described["device"] == "cpu"
    assert described["skipped"][0]["runtime"] == "tensorrt"


def test_a_runtime_that_fails_to_load_falls_back(ctx, monkeypatch):
    def broken(_ctx):
        raise OSError("libonnxruntime.so: cannot open shared object file")

    monkeypatch.setitem(selection.RUNTIMES, "onnxruntime", broken)
    choice = selection.select(["onnxruntime", "torch"], ctx)
    assert choice.runtime.name == "torch"
    assert choice.skipped == (
        (
            "onnxruntime",
            "failed to load: OSError: libonnxruntime.so: cannot open shared object file",
        ),
    )


def test_when_nothing_in_the_list_loads_torch_eager_fp32_runs(ctx):
    ctx.precision = "fp16"
    choice = selection.select(["onnxruntime", "torch-cudagraphs"], ctx)
    assert choice.runtime.name == "torch" and choice.runtime.precision == "fp32"
    assert "runs this network in ['fp32'] only, not fp16" in choice.skipped[0][1]
    assert choice.skipped[-1] == (
        "(fallback)",
        "none of ['onnxruntime', 'torch-cudagraphs'] loaded; torch eager fp32 runs",
    )


def test_torch_bf16_on_the_cpu_runs_close_to_fp32(ctx):
    fp32 = selection.prepare("torch", ctx)
    ctx.precision = "bf16"
    bf16 = selection.prepare("torch", ctx)
    inputs = fp32.io.random(4, torch.Generator().manual_seed(1), label_high=11)
    a, b = fp32.forward(inputs)["out"], bf16.forward(inputs)["out"]
    assert b.dtype == torch.float32 and 0 < (a - b).abs().max() < 0.1


@pytest.fixture
def cd_copy(tmp_path) -> Path:
    folder = tmp_path / "repo" / "fashion-cd"
    shutil.copytree(ROOT / "fashion-cd", folder)
    return folder


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("runtimes", ["onnxruntime", "onxruntime"], "runtimes[1] must be one of"),
        (
            "runtimes",
            ["onnxruntime", "onxruntime"],
            "(did you mean onnxruntime?), got 'onxruntime'",
        ),
        ("runtimes", [], "runtimes must be a non-empty list of distinct runtime names"),
        ("runtimes", ["torch", "torch"], "runtimes must be a non-empty list of distinct"),
        ("precision", "fp8", "precision must be one of ['fp32', 'fp16', 'bf16'], got 'fp8'"),
    ],
)
def test_model_yaml_runtime_fields_are_checked(cd_copy, field, value, message):
    rewrite(cd_copy, field, value)
    with pytest.raises(RepositoryError) as err:
        Repository(cd_copy.parent)
    assert message in str(err.value) and "model.yaml" in str(err.value)


def test_runtimes_default_to_torch_and_a_gaussian_has_none(cd_copy, tmp_path):
    rewrite(cd_copy, "runtimes", DELETE)
    rewrite(cd_copy, "precision", DELETE)
    spec = Repository(cd_copy.parent).spec("fashion-cd")
    assert spec.runtimes == ("torch",) and spec.precision == "fp32"
    gaussian = tmp_path / "g" / "fashion-gaussian"
    shutil.copytree(ROOT / "fashion-gaussian", gaussian)
    rewrite(gaussian, "runtimes", ["onnxruntime"])
    with pytest.raises(RepositoryError, match="runtimes must be absent: a 'gaussian' model"):
        Repository(gaussian.parent)


def test_tensorrt_profiles_come_from_the_batch_buckets(repo):
    io = network_io(repo.spec("fashion-edm"))
    profiles = profile_shapes(io, (1, 2, 4, 256))
    assert [p["x"] for p in profiles] == [
        ((1, 1, 28, 28), (1, 1, 28, 28), (1, 1, 28, 28)),
        ((2, 1, 28, 28), (2, 1, 28, 28), (2, 1, 28, 28)),
        ((3, 1, 28, 28), (4, 1, 28, 28), (4, 1, 28, 28)),
        ((5, 1, 28, 28), (256, 1, 28, 28), (256, 1, 28, 28)),
    ]
    assert profiles[2]["label"] == ((3,), (4,), (4,)) and set(profiles[0]) == {
        "x",
        "c_noise",
        "label",
    }


def test_tensorrt_plan_keys_change_with_what_the_plan_depends_on(repo):
    io = network_io(repo.spec("fashion-edm"))
    versions = {"tensorrt": "10.13", "gpu": "NVIDIA H200"}
    base = plan_key_fields("sha256:a", io, (1, 2), "fp16", versions)
    assert base["buckets"] == [1, 2] and base["io"] == io.signature()
    changed = [
        plan_key_fields("sha256:b", io, (1, 2), "fp16", versions),
        plan_key_fields("sha256:a", io, (1, 4), "fp16", versions),
        plan_key_fields("sha256:a", io, (1, 2), "fp32", versions),
        plan_key_fields("sha256:a", io, (1, 2), "fp16", {**versions, "gpu": "NVIDIA H100"}),
    ]
    assert all(c != base for c in changed)


def test_onnxruntime_tensorrt_provider_options(repo, tmp_path):
    io = network_io(repo.spec("fashion-cd"))
    opts = tensorrt_ep_options(io, (1, 8), "fp16", tmp_path)
    assert opts["trt_fp16_enable"] is True and opts["trt_engine_cache_path"] == str(tmp_path)
    assert opts["trt_profile_min_shapes"] == (
        "x:1x1x28x28,c_noise:1,label:1,x:2x1x28x28,c_noise:2,label:2"
    )
    assert opts["trt_profile_max_shapes"] == (
        "x:1x1x28x28,c_noise:1,label:1,x:8x1x28x28,c_noise:8,label:8"
    )


TENSORRT_MISSING = (
    NO_TENSORRT
    if importlib.util.find_spec("tensorrt") is None
    else None
    if torch.cuda.is_available()
    else "TensorRT needs a CUDA GPU; torch sees none"
)


@pytest.mark.skipif(TENSORRT_MISSING is not None, reason=TENSORRT_MISSING or "")
def test_tensorrt_plan_matches_torch(repo, tmp_path):
    from engines.runtimes.build import build_engine

    report = build_engine(
        repo, "fashion-cd", "tensorrt", "fp32", "cuda", EngineCache(tmp_path), progress=print
    )
    assert max(report.errors.values()) <= 1e-3  # TF32 may be on
    again = selection.prepare(
        "tensorrt", repo.engine_context("fashion-cd", device="cuda", cache=EngineCache(tmp_path))
    )
    assert again.name == "tensorrt"


def test_tensorrt_missing_is_reported_plainly(ctx):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(RuntimeUnavailable, match="tensorrt Python package not installed"):
        selection.prepare("tensorrt", ctx)


def test_moving_a_model_whose_network_is_not_torch_says_where_the_network_stays(repo, caplog):
    model = repo.load("fashion-cd", progress=lambda m: None)
    assert model.runtime == "onnxruntime"
    with caplog.at_level("WARNING", logger="fewstep.engines"):
        model.to("meta")  # stands in for a GPU: only the torch modules move
    assert "leaves its network on onnxruntime (cpu); load it with device='meta'" in caplog.text
