"""ONNX export and ONNX Runtime against torch, for every shipped network; the build cache."""

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engines import quality
from engines.nets import UNet, UNetConfig
from engines.repository import Repository
from engines.runtimes.build import build_engine
from engines.runtimes.export import (
    FP32_TOLERANCE,
    EngineCache,
    cache_key,
    max_errors,
    network_io,
    torch_reference,
)
from engines.runtimes.select import EngineContext, onnx_artifact, prepare

ROOT = Path(__file__).parents[2] / "model_repo"
pytestmark = pytest.mark.usefixtures("one_torch_thread")
NETWORKS = [s.name for s in Repository(ROOT).specs() if s.network is not None]


@pytest.fixture(scope="module")
def repo():
    return Repository(ROOT)


@pytest.fixture(scope="module")
def cache():
    """The session's cache (tests/conftest.py): loads elsewhere in the suite reuse these."""
    return EngineCache()


def quiet(message: str) -> None:
    pass


@pytest.mark.parametrize("name", NETWORKS)
def test_onnxruntime_matches_torch_for_every_shipped_network(repo, cache, name):
    report = build_engine(repo, name, "onnxruntime", cache=cache, progress=quiet)
    assert sorted(report.errors) == [1, 3, 8, 32]
    assert max(report.errors.values()) <= FP32_TOLERANCE
    assert report.ok() and "within 0.0001" in report.text()


@pytest.mark.parametrize("name", NETWORKS)
def test_sampler_output_through_onnxruntime_matches_torch_for_the_same_seed(repo, cache, name):
    spec = repo.spec(name)
    assert spec.runtimes[-2:] == ("onnxruntime", "torch")  # what the shipped model.yaml asks
    s = spec.sampling
    images = {}
    for runtime in ("onnxruntime", "torch"):
        model = repo.load(name, cache=cache, progress=quiet, runtimes=[runtime])
        assert model.runtime == runtime
        images[runtime] = quality.generate(model, s.default_sampler, s.default_steps, n=6, seed=7)
    (ort_images, labels, nfe, _), (torch_images, *_) = images["onnxruntime"], images["torch"]
    assert nfe == s.default_steps and labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert (ort_images - torch_images).abs().max() < 1e-3  # data range [-1, 1]


def test_a_build_is_reused_until_something_changes(repo, tmp_path):
    cache = EngineCache(tmp_path)
    ctx = repo.engine_context("fashion-cd", cache=cache, progress=quiet)
    first = onnx_artifact(ctx)
    again = onnx_artifact(ctx)
    assert first.rebuilt and not again.rebuilt and again.path == first.path
    manifest = json.loads((first.path.parent / "manifest.json").read_text())
    assert manifest["fingerprint"] == ctx.fingerprint and manifest["opset"] == 17
    assert max(manifest["max_abs_error_fp32"].values()) <= FP32_TOLERANCE
    other = onnx_artifact(replace(ctx, fingerprint="sha256:other-weights"))
    assert other.rebuilt and other.path.parent != first.path.parent


def test_a_corrupt_or_partial_artifact_is_rebuilt(repo, tmp_path):
    lines = []
    ctx = repo.engine_context("fashion-cd", cache=EngineCache(tmp_path), progress=lines.append)
    path = onnx_artifact(ctx).path
    path.write_bytes(b"not an onnx file")
    rebuilt = onnx_artifact(ctx)
    assert rebuilt.rebuilt and "does not match the sha256 in its manifest" in "\n".join(lines)
    (path.parent / "manifest.json").unlink()
    assert onnx_artifact(ctx).rebuilt and "is incomplete" in lines[-8]


def test_a_cached_file_onnxruntime_cannot_read_is_rebuilt_once(repo, tmp_path):
    """A file that matches its manifest but does not load (e.g. written by a broken tool)."""
    lines = []
    ctx = repo.engine_context("fashion-cd", cache=EngineCache(tmp_path), progress=lines.append)
    path = onnx_artifact(ctx).path
    path.write_bytes(b"garbage")
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"] = __import__("hashlib").sha256(b"garbage").hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    runtime = prepare("onnxruntime", ctx)
    assert runtime.name == "onnxruntime"
    assert any("cached ONNX failed to load" in line for line in lines)
    inputs = runtime.io.random(2, torch.Generator().manual_seed(0), label_high=11)
    assert runtime.forward(inputs)["out"].shape == (2, 1, 28, 28)


def test_cache_keys_depend_on_every_field():
    fields = {"fingerprint": "sha256:a", "precision": "fp32", "opset": 17}
    keys = {cache_key(fields)}
    for change in ({"fingerprint": "sha256:b"}, {"precision": "fp16"}, {"opset": 18}):
        keys.add(cache_key({**fields, **change}))
    assert len(keys) == 4 and cache_key(dict(reversed(fields.items()))) in keys


def test_build_of_a_model_without_a_network_is_refused(repo, tmp_path):
    with pytest.raises(ValueError, match="has no network to compile"):
        build_engine(repo, "fashion-gaussian", "onnxruntime", cache=EngineCache(tmp_path))


def test_a_latent_network_with_a_guidance_embedding_exports_too(tmp_path):
    """An LCM student's UNet (4x7x7 latents, w embedding input) gets the same treatment."""
    config = UNetConfig(
        in_channels=4, channels=(16, 32), blocks=1, emb_dim=32, heads=2, guidance_dim=8
    )
    net = UNet(config).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    for p in net.parameters():  # random everywhere: the zero-initialised layers too
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    io = network_io(SimpleNamespace(network=config, shape=(4, 7, 7)))
    assert io.input_names == ["x", "c_noise", "label", "w_embedding"]
    ctx = EngineContext(
        model="tiny-lcm@1",
        fingerprint="sha256:tiny",
        net=net,
        io=io,
        buckets=(1, 2, 4),
        label_high=11,
        cache=EngineCache(tmp_path),
        progress=quiet,
    )
    runtime = prepare("onnxruntime", ctx)
    errors = max_errors(torch_reference(net, io), runtime, (1, 5), label_high=11)
    assert max(errors.values()) <= FP32_TOLERANCE
    inputs = io.random(3, g, label_high=11)
    moved = runtime.forward({**inputs, "w_embedding": inputs["w_embedding"] + 1})["out"]
    assert (moved - runtime.forward(inputs)["out"]).abs().max() > 1e-3  # w is wired through
