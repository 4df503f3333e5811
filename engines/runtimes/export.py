"""torch -> ONNX export of a model's network, equivalence checks, and the build cache.

Only the network is exported (not the sampler, not the preconditioning): its inputs are x,
c_noise (one per row), the class label and, for LCM students, the guidance embedding,
every one with a dynamic batch dimension. Artifacts live in a cache outside git
(`$FEWSTEP_ENGINE_CACHE`, else ~/.cache/fewstep/engines), one folder per key: the weights'
fingerprint, the artifact kind, precision and tool versions. A folder holds the artifact and
manifest.json with its sha256 and the measured errors; a missing, partial or corrupt
artifact is rebuilt, so a rebuild happens only when something changed or broke.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from engines.runtimes.base import IOSpec, Runtime, TensorSpec

OPSET = 17
VERIFY_BATCHES = (1, 3, 8, 32)
FP32_TOLERANCE = 1e-4
Progress = Callable[[str], None]


class BuildError(RuntimeError):
    """An export or build that failed, or an artifact that is not equivalent to torch."""


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def network_io(spec) -> IOSpec:
    """The inputs and output of a model's UNet (ModelSpec with a `network`)."""
    net = spec.network
    inputs = [
        TensorSpec("x", torch.float32, tuple(spec.shape)),
        TensorSpec("c_noise", torch.float32, ()),
    ]
    if net.classes:
        inputs.append(TensorSpec("label", torch.int64, ()))
    if net.guidance_dim:
        inputs.append(TensorSpec("w_embedding", torch.float32, (net.guidance_dim,)))
    return IOSpec(tuple(inputs), (TensorSpec("out", torch.float32, tuple(spec.shape)),))


class Exportable(nn.Module):
    """The network with positional, named inputs (what ONNX and TensorRT see). A denoiser
    network takes (x, c_noise, cond); any other (a vocoder) its inputs in IOSpec order."""

    def __init__(self, net: nn.Module, io: IOSpec) -> None:
        super().__init__()
        self.net, self.names = net, io.input_names

    def forward(self, *args: Tensor) -> Tensor:
        if self.names[:2] != ["x", "c_noise"]:
            return self.net(*args)
        named = dict(zip(self.names, args, strict=True))
        x, c_noise = named.pop("x"), named.pop("c_noise")
        return self.net(x, c_noise, named or None)


def export_onnx(
    net: nn.Module, io: IOSpec, path: Path, opset: int = OPSET, label_high: int = 1
) -> None:
    """Write the network as ONNX with a dynamic batch on every input and output (and the
    IOSpec's dynamic dimensions dynamic too)."""
    example = io.random(2, torch.Generator().manual_seed(0), label_high=label_high)
    axes = {
        t.name: {0: "batch"}
        | {i + 1: f"{t.name}_{i + 1}" for i, d in enumerate(t.row_shape) if d is None}
        for t in (*io.inputs, *io.outputs)
    }
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # the tracer warns about Python arithmetic on shapes; the dynamic batch is checked
        # by verify() at several batch sizes instead
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Exportable(net, io).eval(),
            tuple(example[n] for n in io.input_names),
            str(path),
            input_names=io.input_names,
            output_names=io.output_names,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )


def max_errors(
    reference: Callable[[dict[str, Tensor]], Tensor],
    runtime: Runtime,
    batches: Sequence[int] = VERIFY_BATCHES,
    label_high: int = 1,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[int, float]:
    """Max abs difference between the torch network and a runtime on random inputs."""
    g = torch.Generator().manual_seed(seed)
    errors = {}
    for rows in batches:
        inputs = runtime.io.random(rows, g, label_high=label_high)
        with torch.inference_mode():
            want = reference(inputs).float()
        got = runtime.forward({k: v.to(runtime.device) for k, v in inputs.items()})
        name = runtime.io.output_names[0]
        errors[rows] = float((got[name].float().cpu() - want.cpu()).abs().max())
        if progress:
            progress(f"  batch {rows:>3}: max abs error {errors[rows]:.2e}")
    return errors


def cpu_copy(net: nn.Module) -> nn.Module:
    """The network on the CPU in fp32 (what artifacts are exported from and checked against)."""
    return copy.deepcopy(net).float().cpu().eval()


def torch_reference(net: nn.Module, io: IOSpec) -> Callable[[dict[str, Tensor]], Tensor]:
    """The eager fp32 CPU network (a copy) as a function of named inputs."""
    module = Exportable(cpu_copy(net), io)

    def run(inputs: dict[str, Tensor]) -> Tensor:
        return module(*(inputs[n].cpu() for n in io.input_names))

    return run


def default_cache() -> Path:
    env = os.environ.get("FEWSTEP_ENGINE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fewstep" / "engines"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(fields: dict[str, object]) -> str:
    """16 hex of the sha256 of the key fields (sorted JSON): the artifact's folder name."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Artifact:
    """One built file in the cache and what it was built from."""

    path: Path
    manifest: dict
    rebuilt: bool  # False: reused from the cache


class EngineCache:
    """Artifacts under root/<model>/<kind>-<key>/, each with a manifest.json."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache()

    def folder(self, model: str, kind: str, fields: dict[str, object]) -> Path:
        return self.root / model / f"{kind}-{cache_key(fields)}"

    def check(self, folder: Path, filename: str) -> str | None:
        """None if the artifact is intact, else why it must be rebuilt."""
        manifest_path, path = folder / "manifest.json", folder / filename
        if not folder.exists():
            return "not built yet"
        if not manifest_path.is_file() or not path.is_file():
            return f"{folder} is incomplete (an interrupted build?)"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            return f"{manifest_path} is unreadable ({err})"
        if manifest.get("sha256") != sha256_file(path):
            return f"{path} does not match the sha256 in its manifest (corrupt or edited)"
        return None

    def get_or_build(
        self,
        model: str,
        kind: str,
        fields: dict[str, object],
        filename: str,
        build: Callable[[Path], dict],
        progress: Progress = stderr_progress,
        force: bool = False,
    ) -> Artifact:
        """The cached artifact for these key fields, built (atomically) if missing or bad.

        `build(path)` writes the artifact at path and returns extra manifest entries.
        """
        folder = self.folder(model, kind, fields)
        reason = "rebuild asked for" if force else self.check(folder, filename)
        if reason is None:
            manifest = json.loads((folder / "manifest.json").read_text())
            progress(f"{model}: {kind} artifact up to date in {folder}")
            return Artifact(folder / filename, manifest, rebuilt=False)
        progress(f"{model}: building the {kind} artifact ({reason}) in {folder}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            begin = time.perf_counter()
            extra = build(staging / filename)
            manifest = {
                **fields,
                **extra,
                "sha256": sha256_file(staging / filename),
                "build_seconds": round(time.perf_counter() - begin, 3),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return Artifact(folder / filename, manifest, rebuilt=True)
