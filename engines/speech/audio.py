"""Log-mel features (torch.stft + librosa's mel filterbank), Griffin-Lim, audio encoders."""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class MelConfig:
    sample_rate: int = 22050
    n_fft: int = 1024
    hop: int = 256
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float = 8000.0

    def frames(self, samples: int) -> int:
        """Frames torch.stft (center=True) gives for this many samples."""
        return samples // self.hop + 1


_FILTERS: dict[MelConfig, Tensor] = {}


def mel_filters(cfg: MelConfig) -> Tensor:
    """(n_mels, n_fft//2+1) Slaney mel filterbank from librosa, cached per config."""
    if cfg not in _FILTERS:
        import librosa

        fb = librosa.filters.mel(
            sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax
        )
        _FILTERS[cfg] = torch.from_numpy(fb).float()
    return _FILTERS[cfg]


def log_mel(wave: Tensor, cfg: MelConfig) -> Tensor:
    """(samples,) float wave in [-1, 1] -> (n_mels, frames) natural-log mel magnitude."""
    window = torch.hann_window(cfg.n_fft)
    spec = torch.stft(wave, cfg.n_fft, cfg.hop, window=window, return_complex=True).abs()
    return torch.log(torch.clamp(mel_filters(cfg) @ spec, min=1e-5))


class Stopped(Exception):
    """Long compute gave up because its caller's should_stop() said so (the job was
    canceled or passed its deadline)."""


StopCheck = Callable[[], bool]


def never() -> bool:
    return False


class Vocoder(Protocol):
    """Log-mel -> waveform; Griffin-Lim now, a neural vocoder can take its place."""

    sample_rate: int

    def __call__(
        self, mels: Tensor, frames: Tensor, should_stop: StopCheck = never
    ) -> list[Tensor]:
        """(B, n_mels, T) padded log-mels and each row's frame count -> one wave per row.
        Raises Stopped as soon as should_stop() is true (checked between iterations)."""
        ...


class GriffinLim:
    """Fast Griffin-Lim (Perraudin et al. 2013): pseudo-inverse mel, momentum iterations.

    Deterministic: the phase starts at zero, so the same mel gives the same samples.
    """

    def __init__(self, cfg: MelConfig, iterations: int = 32, momentum: float = 0.99) -> None:
        self.cfg, self.iterations, self.momentum = cfg, iterations, momentum
        self.sample_rate = cfg.sample_rate
        self.inverse = torch.linalg.pinv(mel_filters(cfg))
        self.window = torch.hann_window(cfg.n_fft)

    def _stft(self, wave: Tensor) -> Tensor:
        return torch.stft(
            wave, self.cfg.n_fft, self.cfg.hop, window=self.window, return_complex=True
        )

    def _istft(self, spec: Tensor, length: int) -> Tensor:
        return torch.istft(spec, self.cfg.n_fft, self.cfg.hop, window=self.window, length=length)

    @torch.no_grad()
    def __call__(
        self, mels: Tensor, frames: Tensor, should_stop: StopCheck = never
    ) -> list[Tensor]:
        # FFTs of this size run about 2x faster on one thread than split over two (measured
        # on the 2-core machine), so the iterations run single-threaded.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._run(mels, frames, should_stop)
        finally:
            torch.set_num_threads(threads)

    def _run(self, mels: Tensor, frames: Tensor, should_stop: StopCheck) -> list[Tensor]:
        mels = mels.float().cpu()
        mag = torch.clamp(self.inverse @ torch.exp(mels), min=0.0)  # (B, F, T)
        length = (mels.shape[-1] - 1) * self.cfg.hop
        # Frames past each row's end are silent, so rows of one batch do not mix.
        t = torch.arange(mels.shape[-1])
        mag = mag * (t[None, :] < frames.cpu()[:, None]).unsqueeze(1)
        spec = mag.to(torch.complex64)
        previous = torch.zeros_like(spec)
        for _ in range(self.iterations):
            if should_stop():
                raise Stopped("vocoding stopped: the job was canceled or is past its deadline")
            rebuilt = self._stft(self._istft(spec, length))
            angles = rebuilt - (self.momentum / (1 + self.momentum)) * previous
            previous = rebuilt
            spec = mag * angles / (angles.abs() + 1e-8)
        wave = self._istft(spec, length)
        return [w[: max(int(n) - 1, 1) * self.cfg.hop] for w, n in zip(wave, frames, strict=True)]


# response_format -> content type
FORMATS = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "pcm": "audio/pcm",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
}


def available_formats() -> list[str]:
    """The response formats this machine can encode (libsndfile decides mp3 and opus)."""
    import soundfile as sf

    have = ["wav", "flac", "pcm"]
    subtypes = sf.available_formats()
    if "MP3" in subtypes or "MPEG" in subtypes:
        have.append("mp3")
    if "OGG" in subtypes and "OPUS" in sf.available_subtypes("OGG"):
        have.append("opus")
    return have


def pcm16(wave: Tensor) -> np.ndarray:
    return (np.clip(wave.numpy(), -1.0, 1.0) * 32767.0).round().astype("<i2")


def encode(wave: Tensor, sample_rate: int, fmt: str) -> bytes:
    """Mono 16-bit audio as fmt bytes; pcm is raw little-endian samples (OpenAI's format)."""
    samples = pcm16(wave)
    if fmt == "pcm":
        return samples.tobytes()
    import soundfile as sf

    buf = io.BytesIO()
    if fmt == "wav":
        sf.write(buf, samples, sample_rate, format="WAV", subtype="PCM_16")
    elif fmt == "flac":
        sf.write(buf, samples, sample_rate, format="FLAC", subtype="PCM_16")
    elif fmt == "mp3":
        sf.write(buf, samples, sample_rate, format="MP3", subtype="MPEG_LAYER_III")
    elif fmt == "opus":
        import soxr  # Opus takes 8, 12, 16, 24 or 48 kHz only

        sf.write(
            buf, soxr.resample(samples, sample_rate, 24000), 24000, format="OGG", subtype="OPUS"
        )
    else:
        raise ValueError(f"unknown audio format {fmt!r}")
    return buf.getvalue()


def peak_normalise(wave: Tensor, peak: float = 0.9) -> Tensor:
    top = float(wave.abs().max()) if wave.numel() else 0.0
    return wave * (peak / top) if top > 1e-4 and math.isfinite(top) else wave
