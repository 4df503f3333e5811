"""A Vocos-style neural vocoder: log-mel -> STFT magnitude and phase -> inverse STFT.

Siuzdenko et al. 2023, "Vocos: closing the gap between time-domain and Fourier-based neural
vocoders". A ConvNeXt-1D backbone runs at the mel's frame rate (no upsampling layers, the
reason it is cheap on a CPU) and predicts, per frame, the log magnitude and the phase angle
of the n_fft-point STFT; the waveform is their inverse STFT at the mel's hop.

The inverse STFT is torch.istft in torch; in an ONNX export (ONNX has no inverse STFT) it is
one `conv_transpose1d` whose kernel is the windowed inverse real DFT (overlap-add is the
transposed convolution's stride), divided by the window's overlap envelope. The two agree
to float rounding (tests/engines/test_vocoder.py).

Rows of a padded batch are independent: the hidden state is zeroed past each row's length
after every block (what the convolutions' zero padding gives a row alone), and frames past
the length get zero magnitude, so a row's samples never depend on its batch-mates.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class VocoderConfig:
    n_mels: int = 80
    n_fft: int = 1024
    hop: int = 256
    width: int = 128  # backbone channels
    blocks: int = 8  # ConvNeXt blocks
    expand: int = 3  # a block's pointwise hidden width = expand * width
    kernel: int = 7  # depthwise convolution size

    def __post_init__(self) -> None:
        if self.n_fft % 2 or self.hop > self.n_fft or self.hop < 1:
            raise ValueError(f"need an even n_fft >= hop >= 1, got {self.n_fft}, {self.hop}")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd, got {self.kernel}")

    @property
    def bins(self) -> int:
        return self.n_fft // 2 + 1


class ConvNeXtBlock(nn.Module):
    """Depthwise conv -> LayerNorm -> pointwise MLP (GELU) -> layer scale, residual."""

    def __init__(self, width: int, expand: int, kernel: int, scale: float) -> None:
        super().__init__()
        self.dw = nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=width)
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, expand * width)
        self.down = nn.Linear(expand * width, width)
        self.gamma = nn.Parameter(torch.full((width,), scale))

    def forward(self, x: Tensor) -> Tensor:
        h = self.dw(x).transpose(1, 2)
        h = self.down(torch.nn.functional.gelu(self.up(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


class InverseSTFT(nn.Module):
    """(B, bins, T) real and imaginary STFT -> (B, (T - 1) * hop) samples, the inverse of
    torch.stft(center=True, window=hann) trimmed to whole hops."""

    def __init__(self, n_fft: int, hop: int) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.use_fft = True  # False: the export's transposed convolution in torch too
        bins = n_fft // 2 + 1
        window = torch.hann_window(n_fft, dtype=torch.float64)
        n = torch.arange(n_fft, dtype=torch.float64)
        k = torch.arange(bins, dtype=torch.float64)
        angle = 2 * math.pi * k[:, None] * n[None, :] / n_fft
        weight = torch.full((bins, 1), 2.0, dtype=torch.float64)
        weight[0] = weight[-1] = 1.0  # DC and Nyquist appear once in the full spectrum
        real = weight * torch.cos(angle) / n_fft * window
        imag = -weight * torch.sin(angle) / n_fft * window
        kernel = torch.cat([real, imag])[:, None, :]  # (2 * bins, 1, n_fft)
        self.register_buffer("kernel", kernel.float(), persistent=False)
        self.register_buffer("window_sq", (window**2).float()[None, None, :], persistent=False)
        self.register_buffer("window", window.float(), persistent=False)

    def forward(self, real: Tensor, imag: Tensor, mask: Tensor | None = None) -> Tensor:
        """mask (B, 1, T): the frames each row has. Every row is normalised by the overlap
        envelope of its own frames, so its samples are what it gives alone."""
        if mask is None:
            mask = torch.ones_like(real[:, :1])
        envelope = self._envelope(mask)  # (B, samples)
        # a row's samples end at its last frame's centre; past that, silence
        t = torch.arange(envelope.shape[-1], device=mask.device)
        keep = (t[None, :] < (mask.sum((1, 2))[:, None] - 1) * self.hop).to(real.dtype)
        if torch.onnx.is_in_onnx_export() or not self.use_fft:
            return self.overlap_add(real, imag) / envelope * keep
        length = (real.shape[-1] - 1) * self.hop
        wave = torch.istft(
            torch.complex(real, imag), self.n_fft, self.hop, window=self.window, length=length
        )  # divided by the envelope of all T frames: undo that, divide by the row's own
        return wave * (self._envelope(torch.ones_like(mask[:1])) / envelope) * keep

    def _trim(self, full: Tensor, frames: int) -> Tensor:
        half = self.n_fft // 2
        return full[..., half : half + (frames - 1) * self.hop]

    def _envelope(self, mask: Tensor) -> Tensor:
        """(B, 1, T) frame mask -> (B, samples) sum of the squared windows over them."""
        env = nn.functional.conv_transpose1d(mask, self.window_sq, stride=self.hop)[:, 0]
        return self._trim(env, mask.shape[-1]).clamp(min=1e-8)

    def overlap_add(self, real: Tensor, imag: Tensor) -> Tensor:
        """The windowed inverse DFT of every frame, overlap-added (not yet normalised)."""
        spec = torch.cat([real, imag], dim=1)  # (B, 2 * bins, T)
        wave = nn.functional.conv_transpose1d(spec, self.kernel, stride=self.hop)[:, 0]
        return self._trim(wave, spec.shape[-1])


class Vocos(nn.Module):
    """Natural-log mel (B, n_mels, T) and frames per row (B,) -> waves (B, (T - 1) * hop).

    Row i's audio is its first (frames[i] - 1) * hop samples."""

    def __init__(self, cfg: VocoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Conv1d(cfg.n_mels, cfg.width, cfg.kernel, padding=cfg.kernel // 2)
        self.norm = nn.LayerNorm(cfg.width)
        scale = 1.0 / cfg.blocks
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(cfg.width, cfg.expand, cfg.kernel, scale) for _ in range(cfg.blocks)
        )
        self.final_norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, 2 * cfg.bins)
        self.istft = InverseSTFT(cfg.n_fft, cfg.hop)
        # the log-mel's per-bin statistics on the training audio (set by the recipe)
        self.register_buffer("mel_mean", torch.zeros(cfg.n_mels))
        self.register_buffer("mel_std", torch.ones(cfg.n_mels))

    def set_stats(self, mean: Tensor, std: Tensor) -> None:
        self.mel_mean.copy_(mean)
        self.mel_std.copy_(std)

    def spectrum(self, mel: Tensor, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Real and imaginary STFT (B, bins, T), zero past each row's frames, and the
        (B, 1, T) frame mask."""
        t = torch.arange(mel.shape[-1], device=mel.device)
        mask = (t[None, :] < frames[:, None]).to(mel.dtype)[:, None, :]  # (B, 1, T)
        x = (mel - self.mel_mean[:, None]) / self.mel_std[:, None] * mask
        x = self.embed(x)
        x = self.norm(x.transpose(1, 2)).transpose(1, 2) * mask
        for block in self.blocks:
            x = block(x) * mask
        h = self.head(self.final_norm(x.transpose(1, 2))).transpose(1, 2)
        log_mag, phase = h[:, : self.cfg.bins], h[:, self.cfg.bins :]
        mag = torch.exp(log_mag.clamp(max=math.log(100.0))) * mask
        return mag * torch.cos(phase), mag * torch.sin(phase), mask

    def forward(self, mel: Tensor, frames: Tensor) -> Tensor:
        return self.istft(*self.spectrum(mel, frames))
