"""Neural vocoders that several speech models share: `<root>/_vocoders/<name>/`.

A folder holds vocoder.yaml (name, kind, sample_rate, network, optional runtimes) and
numeric version folders with weights.safetensors and a model card; the highest version is
used. A speech model picks one with `speech.vocoder: <name>` in its model.yaml
(`griffin-lim`, the default, needs no files). The network runs on the first runtime of the
vocoder's `runtimes` that loads here (ONNX Runtime, else torch), through the same runtime
selection and build cache as the image networks; one call vocodes a whole padded batch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

from engines.nets.config import ConfigError, config_from_dict
from engines.nets.vocoder import VocoderConfig, Vocos
from engines.repository.spec import RepositoryError
from engines.runtimes.base import RANDOM_LENGTH, IOSpec, Runtime, TensorSpec
from engines.runtimes.select import RUNTIMES, Selection
from engines.speech.audio import StopCheck, Stopped, never
from engines.speech.spec import GRIFFIN_LIM

FOLDER = "_vocoders"
FILE = "vocoder.yaml"
KINDS = ("vocos",)
DEFAULT_RUNTIMES = ("onnxruntime", "torch")
KEYS = ("name", "kind", "sample_rate", "network", "runtimes")


@dataclass(frozen=True)
class VocoderSpec:
    name: str
    kind: str
    sample_rate: int
    network: VocoderConfig
    runtimes: tuple[str, ...]
    folder: Path  # the version folder
    version: int


def vocoder_names(root: Path) -> list[str]:
    folder = root / FOLDER
    return (
        sorted(p.name for p in folder.iterdir() if (p / FILE).is_file()) if folder.is_dir() else []
    )


def read_vocoder(root: Path, name: str) -> VocoderSpec:
    """The vocoder.yaml of `<root>/_vocoders/<name>/`, checked; RepositoryError names the
    file and the key that is wrong."""
    folder = root / FOLDER / name
    path = folder / FILE
    if not path.is_file():
        raise RepositoryError(
            f"no vocoder {name!r}: {path} not found; the vocoders under {root / FOLDER} are "
            f"{vocoder_names(root)}, or use {GRIFFIN_LIM!r}"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise RepositoryError(f"{path}: unreadable ({err})") from None
    if not isinstance(data, dict):
        raise RepositoryError(f"{path}: must be a mapping with keys {list(KEYS)}")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise RepositoryError(f"{path}: unknown key(s) {unknown}; the keys are {list(KEYS)}")
    if data.get("name") != name:
        raise RepositoryError(f"{path}: name must be the folder's name {name!r}")
    if data.get("kind") not in KINDS:
        raise RepositoryError(f"{path}: kind must be one of {list(KINDS)}")
    rate = data.get("sample_rate")
    if not isinstance(rate, int) or isinstance(rate, bool) or rate < 1:
        raise RepositoryError(f"{path}: sample_rate must be a positive integer, got {rate!r}")
    try:
        network = config_from_dict(VocoderConfig, data.get("network"))
    except ConfigError as err:
        raise RepositoryError(f"{path}: network: {err}") from None
    runtimes = data.get("runtimes", list(DEFAULT_RUNTIMES))
    if (
        not isinstance(runtimes, list)
        or not runtimes
        or any(r not in RUNTIMES for r in runtimes)
        or len(set(runtimes)) != len(runtimes)
    ):
        raise RepositoryError(
            f"{path}: runtimes must be a list of distinct names from {list(RUNTIMES)}"
        )
    versions = [int(p.name) for p in folder.iterdir() if re.fullmatch(r"[1-9][0-9]*", p.name)]
    if not versions:
        raise RepositoryError(f"{folder}: no version folder (1/, 2/, ...) with the weights")
    version = max(versions)
    return VocoderSpec(
        name, data["kind"], rate, network, tuple(runtimes), folder / str(version), version
    )


def check_fits(spec: VocoderSpec, sample_rate: int, hop: int, n_mels: int, where: str) -> None:
    """RepositoryError unless the vocoder takes the speech model's mels."""
    have = (spec.sample_rate, spec.network.hop, spec.network.n_mels)
    if have != (sample_rate, hop, n_mels):
        raise RepositoryError(
            f"{where}: vocoder {spec.name!r} takes {have[2]} mels at {have[0]} Hz, hop "
            f"{have[1]}; the model makes {n_mels} mels at {sample_rate} Hz, hop {hop}: "
            f"pick another vocoder or {GRIFFIN_LIM!r}"
        )


def vocoder_io(cfg: VocoderConfig) -> IOSpec:
    """mel (n_mels, frames) and frames per row in; wave ((frames - 1) * hop) out."""
    return IOSpec(
        (
            TensorSpec("mel", torch.float32, (cfg.n_mels, None)),
            TensorSpec("frames", torch.int64, ()),
        ),
        (TensorSpec("wave", torch.float32, (None,)),),
    )


class NeuralVocoder:
    """A vocoder network on a runtime behind the `Vocoder` interface: one batched pass over
    the padded mels, each row trimmed to its own length."""

    batched = True  # Speech vocodes a request's sentences in one call

    def __init__(self, spec: VocoderSpec, selection: Selection) -> None:
        self.spec, self.selection = spec, selection
        self.runtime: Runtime = selection.runtime
        self.sample_rate = spec.sample_rate
        self.hop = spec.network.hop

    @property
    def name(self) -> str:
        return self.spec.name

    @torch.no_grad()
    def __call__(
        self, mels: Tensor, frames: Tensor, should_stop: StopCheck = never
    ) -> list[Tensor]:
        if should_stop():
            raise Stopped("vocoding stopped: the job was canceled or is past its deadline")
        frames = frames.to(torch.int64).cpu().clamp(min=1, max=mels.shape[-1])
        device = self.runtime.device
        out = self.runtime.forward(
            {"mel": mels.float().to(device).contiguous(), "frames": frames.to(device)}
        )["wave"].cpu()
        return [w[: (int(n) - 1) * self.hop or self.hop] for w, n in zip(out, frames, strict=True)]


# select(net, io, model, runtimes, label_high, weights file) -> the runtime that loaded
Select = Callable[[torch.nn.Module, IOSpec, str, Sequence[str], int, Path], Selection]


def neural_vocoder(spec: VocoderSpec, net: Vocos, select: Select) -> NeuralVocoder:
    """The loaded network on the runtime `select` picks."""
    io = vocoder_io(spec.network)
    model = f"{FOLDER}/{spec.name}@{spec.version}"
    # random frames in the equivalence checks: 0..RANDOM_LENGTH (all of a row, or none)
    selection = select(net, io, model, spec.runtimes, RANDOM_LENGTH + 1, weights_path(spec))
    return NeuralVocoder(spec, selection)


def weights_path(spec: VocoderSpec) -> Path:
    return spec.folder / "weights.safetensors"


def torch_select(net, io, model, preferences, label_high, weights) -> Selection:
    """Torch eager on the CPU: the selection when no runtime context is given."""
    from engines.runtimes.select import EngineContext, select

    ctx = EngineContext(model, "", net, io, (1,), label_high)
    return select(("torch",), ctx)
