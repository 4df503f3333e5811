"""Model kinds: what each can do (sampler families, guidance) and how its folder loads.

A loader gets the spec, the version folder and `wrap`, which turns the torch network into
the callable the denoiser runs (the chosen runtime), and returns the Parts it read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from engines.denoisers import (
    CFGDenoiser,
    ConsistencyDenoiser,
    Denoiser,
    DiscreteTimeEDM,
    EDMDenoiser,
    LCMDenoiser,
)
from engines.gaussian import GaussianStats
from engines.nets import Autoencoder, UNet
from engines.repository.spec import ModelSpec, RepositoryError

Wrap = Callable[[torch.nn.Module], Callable]
NET_KINDS = ("edm", "cm", "lcm")


@dataclass(frozen=True)
class Parts:
    """What a loader read from a version folder."""

    denoiser: Denoiser
    gaussian: GaussianStats | None
    files: Sequence[Path]  # every file read, for the fingerprint
    modules: tuple[torch.nn.Module, ...] = ()  # the networks it built
    decoder: Callable[[Tensor], Tensor] | None = None  # latent models: sampler space -> data
    speech: object | None = None  # kind speech: engines.speech.model.Speech


Loader = Callable[[ModelSpec, Path, Wrap], Parts]


@dataclass(frozen=True)
class Kind:
    """What a model kind can do and how its version folder is loaded."""

    families: tuple[str, ...]  # sampler families (engines.samplers.INFO) that fit it
    guidance: bool  # whether it supports classifier-free guidance
    load: Loader
    modality: str = "image"  # what its requests and outputs are (engines.modalities)


def _load_gaussian(
    spec: ModelSpec, folder: Path, wrap: Wrap | None = None, name: str = "stats.safetensors"
) -> Parts:
    path = folder / name
    rebuild = "rebuild it with `fewstep build gaussian`"
    if spec.kind != "gaussian":
        rebuild = "rerun the recipe in the model card, or set sampling.teleport_sigma to null"
    if not path.is_file():
        raise RepositoryError(
            f"{path} not found; a {spec.kind!r} version folder needs it: {rebuild}"
        )
    try:
        stats = GaussianStats.load(path)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise RepositoryError(
            f"{path}: unreadable Gaussian statistics ({err}); {rebuild}"
        ) from None
    classes = len(spec.labels) or 1
    if stats.shape != spec.shape:
        raise RepositoryError(
            f"{path}: statistics of samples shaped {list(stats.shape)}, "
            f"but model.yaml says shape {list(spec.shape)}; {rebuild} or fix model.yaml"
        )
    if stats.labels != spec.labels or stats.classes != classes:
        raise RepositoryError(
            f"{path}: statistics for {stats.classes} classes {list(stats.labels)}, "
            f"but model.yaml says labels {list(spec.labels)}; {rebuild} or fix model.yaml"
        )
    tensors = (stats.mean, stats.eigvals, stats.eigvecs)
    if not all(torch.isfinite(t).all() for t in tensors) or (stats.eigvals < 0).any():
        raise RepositoryError(f"{path}: non-finite values or negative variances; {rebuild}")
    return Parts(stats.denoiser(), stats, [path])


def _read_tensors(path: Path, what: str) -> dict[str, Tensor]:
    rebuild = "retrain it with `fewstep train` (see the model card's recipe)"
    if not path.is_file():
        raise RepositoryError(f"{path} not found; this version folder needs {what}: {rebuild}")
    try:
        return load_file(str(path))
    except (OSError, ValueError, SafetensorError) as err:
        raise RepositoryError(f"{path}: unreadable {what} ({err}); {rebuild}") from None


def load_weights(module: torch.nn.Module, path: Path, what: str) -> torch.nn.Module:
    """Load weights into a freshly built module; a mismatch names the file and the config."""
    try:
        module.load_state_dict(_read_tensors(path, what))
    except RuntimeError as err:
        first = str(err).splitlines()[1:2] or [str(err)]
        raise RepositoryError(
            f"{path}: the weights do not fit the config in model.yaml ({first[0].strip()})"
        ) from None
    return module.eval().requires_grad_(False)


def _load_unet(spec: ModelSpec, folder: Path) -> tuple[UNet, GaussianStats | None, list[Path]]:
    path = folder / "weights.safetensors"
    net = load_weights(UNet(spec.network), path, "the network weights")
    files, gaussian = [path], None
    if spec.sampling.teleport_sigma is not None:
        stats = _load_gaussian(spec, folder, name="teleport.safetensors")
        files, gaussian = [*files, *stats.files], stats.gaussian
    return net, gaussian, files


def _load_autoencoder(spec: ModelSpec, folder: Path) -> tuple[Autoencoder, Path]:
    path = folder / "autoencoder.safetensors"
    return load_weights(Autoencoder(spec.autoencoder), path, "the autoencoder weights"), path


def _load_edm(spec: ModelSpec, folder: Path, wrap: Wrap) -> Parts:
    net, gaussian, files = _load_unet(spec, folder)
    denoiser = CFGDenoiser(EDMDenoiser(wrap(net), spec.sigma_data), null_label=len(spec.labels))
    if spec.autoencoder is None:
        return Parts(denoiser, gaussian, files, (net,))
    autoencoder, path = _load_autoencoder(spec, folder)  # a latent teacher
    return Parts(denoiser, gaussian, [*files, path], (net, autoencoder), autoencoder.decode)


def _load_cm(spec: ModelSpec, folder: Path, wrap: Wrap) -> Parts:
    net, gaussian, files = _load_unet(spec, folder)
    denoiser = ConsistencyDenoiser(wrap(net), spec.sigma_data, spec.sampling.sigma_min)
    return Parts(denoiser, gaussian, files, (net,))


class _DefaultGuidance:
    """Fills cond['guidance_scale'] with `scale` for rows that do not carry one."""

    def __init__(self, inner: Denoiser, scale: float) -> None:
        self.inner, self.scale = inner, scale

    def __call__(self, x: Tensor, sigma: Tensor, cond=None) -> Tensor:
        cond = dict(cond or {})
        cond.setdefault("guidance_scale", torch.full_like(sigma, self.scale))
        return self.inner(x, sigma, cond)


def _load_lcm(spec: ModelSpec, folder: Path, wrap: Wrap) -> Parts:
    net, gaussian, files = _load_unet(spec, folder)
    autoencoder, path = _load_autoencoder(spec, folder)
    sched = spec.schedule
    lcm = LCMDenoiser(
        DiscreteTimeEDM(EDMDenoiser(wrap(net), spec.sigma_data), sched.vp()),
        sched.vp(),
        prediction="x0",
        timestep_scaling=sched.timestep_scaling,
        sigma_data=sched.boundary_sigma_data,
        embedding_dim=spec.network.guidance_dim,
    )
    # requests without a guidance scale get w = 0 (scale 1), as for CFG models
    denoiser = _DefaultGuidance(lcm, 1.0)
    return Parts(denoiser, gaussian, [*files, path], (net, autoencoder), autoencoder.decode)


def _load_speech(spec: ModelSpec, folder: Path, wrap: Wrap | None = None) -> Parts:
    """Kind speech: encoder, denoiser and mel statistics in one torch module (runtimes other
    than torch are not offered for it yet), and its vocoder: Griffin-Lim, or the shared
    neural vocoder model.yaml names, on the runtime `wrap.select` picks (torch if none)."""
    from engines.nets.tts import TTS
    from engines.nets.vocoder import Vocos
    from engines.repository import vocoders
    from engines.speech.model import Speech

    path = folder / "weights.safetensors"
    tts = load_weights(TTS(spec.speech.network), path, "the network weights")
    files, modules, vocoder = [path], [tts], None
    if spec.speech.vocoder != vocoders.GRIFFIN_LIM:
        vspec = vocoders.read_vocoder(folder.parent.parent, spec.speech.vocoder)
        select = getattr(wrap, "select", None) or vocoders.torch_select
        weights = vocoders.weights_path(vspec)
        net = load_weights(Vocos(vspec.network), weights, "the vocoder weights")
        vocoder = vocoders.neural_vocoder(vspec, net, select)
        files, modules = [path, weights], [tts, net]
    speech = Speech(spec, tts, vocoder)
    return Parts(speech.denoiser, None, files, tuple(modules), speech=speech)


KINDS: dict[str, Kind] = {
    "gaussian": Kind(("ode", "sde"), guidance=False, load=_load_gaussian),
    "edm": Kind(("ode", "sde"), guidance=True, load=_load_edm),
    "cm": Kind(("consistency",), guidance=False, load=_load_cm),
    "lcm": Kind(("consistency",), guidance=True, load=_load_lcm),
    "speech": Kind(
        ("ode", "sde", "consistency"), guidance=False, load=_load_speech, modality="speech"
    ),
}
