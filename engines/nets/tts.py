"""Grad-TTS/CoMoSpeech-style acoustic model: phone encoder, durations, 1-D mel denoiser.

Every layer is masked so that padding never changes a valid frame: the encoder and the
denoiser normalise per position (LayerNorm over channels, never over time) and zero the
padded positions after each convolution. Rows of different lengths can therefore share
one batch and give the same output as alone (up to float rounding of the kernels).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclasses.dataclass(frozen=True)
class TTSConfig:
    n_mels: int = 80
    # phone ids: Festival's radio phone set (50) and the padding id 0; the front end
    # (engines.speech.frontend) checks that its inventory has this size
    phones: int = 51
    width: int = 192  # encoder channels
    enc_convs: int = 3
    enc_layers: int = 2
    heads: int = 2
    ffn: int = 768
    dec_width: int = 192  # denoiser channels
    dec_blocks: int = 8
    dilations: tuple[int, ...] = (1, 2, 4, 8)
    emb_dim: int = 128

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a multiple of heads ({self.heads})")


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each position of a (B, C, T) tensor."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class Encoder(nn.Module):
    """Phones (+ stress, word-final) -> hidden h, prior mean mu per phone, log(1 + frames)."""

    def __init__(self, cfg: TTSConfig) -> None:
        super().__init__()
        w = cfg.width
        self.phone = nn.Embedding(cfg.phones, w, padding_idx=0)
        self.stress = nn.Embedding(2, w)
        self.final = nn.Embedding(2, w)
        self.convs = nn.ModuleList(nn.Conv1d(w, w, 5, padding=2) for _ in range(cfg.enc_convs))
        self.conv_norms = nn.ModuleList(ChannelNorm(w) for _ in range(cfg.enc_convs))
        layer = dict(d_model=w, nhead=cfg.heads, dim_feedforward=cfg.ffn, dropout=0.0)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(**layer, batch_first=True, norm_first=True)
            for _ in range(cfg.enc_layers)
        )
        self.mu = nn.Conv1d(w, cfg.n_mels, 1)
        self.dur = nn.Sequential(
            nn.Conv1d(w, w, 3, padding=1),
            nn.ReLU(),
            ChannelNorm(w),
            nn.Conv1d(w, w, 3, padding=1),
            nn.ReLU(),
            ChannelNorm(w),
            nn.Conv1d(w, 1, 1),
        )

    def forward(
        self, phone: Tensor, stress: Tensor, final: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L) ids (0 pads) -> mu (B, n_mels, L), log(1 + frames) (B, L), mask (B, 1, L)."""
        mask = (phone > 0).unsqueeze(1).to(self.mu.weight.dtype)
        h = (self.phone(phone) + self.stress(stress) + self.final(final)).transpose(1, 2)
        h = h * mask
        for conv, norm in zip(self.convs, self.conv_norms, strict=True):
            h = norm(h + F.relu(conv(h))) * mask
        t = h.transpose(1, 2)
        for layer in self.layers:
            t = layer(t, src_key_padding_mask=phone == 0)
        h = t.transpose(1, 2) * mask
        mu = self.mu(h) * mask
        d = h.detach()
        for i in (0, 3):  # conv -> ReLU -> norm, masked so padding never leaks in
            d = self.dur[i + 2](self.dur[i + 1](self.dur[i](d * mask)))
        logdur = self.dur[6](d * mask).squeeze(1) * mask.squeeze(1)
        return mu, logdur, mask


def length_regulate(mu: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
    """Repeat each phone's mu by its frame count: (B, C, L), (B, L) -> (B, C, T), mask."""
    total = frames.sum(1)
    t_max = max(int(total.max()), 1)
    ends = frames.cumsum(1)  # (B, L)
    t = torch.arange(t_max, device=mu.device)
    # phone index of each frame: how many phone ends are <= t
    index = (ends.unsqueeze(1) <= t[None, :, None]).sum(-1).clamp(max=mu.shape[-1] - 1)
    out = torch.gather(mu, 2, index.unsqueeze(1).expand(-1, mu.shape[1], -1))
    mask = (t[None, :] < total[:, None]).unsqueeze(1).to(mu.dtype)
    return out * mask, mask


def frames_from_logdur(logdur: Tensor, mask: Tensor, speed: Tensor | float = 1.0) -> Tensor:
    """Predicted log(1 + frames) -> integer frames (>= 1 on real phones) at a given speed."""
    speed = torch.as_tensor(speed, dtype=logdur.dtype, device=logdur.device).reshape(-1, 1)
    frames = torch.round(torch.expm1(logdur).clamp(min=0) / speed).clamp(min=1)
    return (frames * mask.squeeze(1)).long()


def noise_embedding(c_noise: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device) / half)
    angles = c_noise.float()[:, None] * freqs[None, :] * 100.0
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, w: int, emb: int, dilation: int) -> None:
        super().__init__()
        self.norm = ChannelNorm(w)
        self.film = nn.Linear(emb, 2 * w)
        self.conv1 = nn.Conv1d(w, w, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv1d(w, w, 3, padding=1)

    def forward(self, h: Tensor, emb: Tensor, mask: Tensor) -> Tensor:
        scale, shift = self.film(emb).unsqueeze(-1).chunk(2, dim=1)
        y = self.norm(h) * (1 + scale) + shift
        y = self.conv1(F.silu(y) * mask)
        y = self.conv2(F.silu(y) * mask)
        return (h + y) * mask


class MelDenoiser(nn.Module):
    """F(c_in x, c_noise | mu, mask): the raw network inside EDM / consistency scalings."""

    def __init__(self, cfg: TTSConfig) -> None:
        super().__init__()
        w, e = cfg.dec_width, cfg.emb_dim
        self.emb_dim = e
        self.embed = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.inp = nn.Conv1d(2 * cfg.n_mels, w, 1)
        dil = [cfg.dilations[i % len(cfg.dilations)] for i in range(cfg.dec_blocks)]
        self.blocks = nn.ModuleList(ResBlock(w, e, d) for d in dil)
        self.out_norm = ChannelNorm(w)
        self.out = nn.Conv1d(w, cfg.n_mels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, c_noise: Tensor, cond: dict[str, Tensor]) -> Tensor:
        mask = cond["mask"].to(x.dtype)
        emb = self.embed(noise_embedding(c_noise, self.emb_dim).to(x.dtype))
        h = self.inp(torch.cat([x * mask, cond["mu"].to(x.dtype)], dim=1)) * mask
        for block in self.blocks:
            h = block(h, emb, mask)
        return self.out(F.silu(self.out_norm(h))) * mask


class TTS(nn.Module):
    """Encoder + denoiser in one module (one weights file per package)."""

    def __init__(self, cfg: TTSConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.denoiser = MelDenoiser(cfg)
        # per-bin statistics of the training log-mels: the model works in standardised units
        self.register_buffer("mel_mean", torch.zeros(cfg.n_mels))
        self.register_buffer("mel_std", torch.ones(cfg.n_mels))

    def set_stats(self, mean: Tensor, std: Tensor) -> None:
        self.mel_mean.copy_(mean)
        self.mel_std.copy_(std)

    def to_log_mel(self, x: Tensor) -> Tensor:
        """Standardised (B, n_mels, T) -> natural-log mel."""
        return x * self.mel_std[:, None] + self.mel_mean[:, None]
