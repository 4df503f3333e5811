"""A class-conditional UNet for small images (28x28 Fashion-MNIST, 7x7 latents).

The network is F(x_in, c_noise, cond) of EDM's preconditioning: denoisers.py turns it into
D(x, sigma, cond). Conditioning: cond["label"] (int64 [B]; `classes` is the null label
used for classifier-free guidance, and a missing cond means unconditional) and, when
`guidance_dim` > 0, cond["w_embedding"] ([B, guidance_dim], LCM's embedding of w). The
forward pass has no Python control flow on data, so it exports to ONNX as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from engines.denoisers import Cond


@dataclass(frozen=True)
class UNetConfig:
    """Sizes of the UNet; stored in model.yaml under `network` so the loader rebuilds it.

    channels[i] is the width at resolution size / 2^i; `attention` adds self-attention at
    the lowest resolution. The noise input is c_noise * noise_scale, so a consistency
    student (c_noise = 250 log sigma) and its EDM teacher (c_noise = log(sigma) / 4) can
    share weights: teacher noise_scale 100, student 0.1.
    """

    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 64)
    blocks: int = 2
    emb_dim: int = 128
    classes: int = 10
    attention: bool = True
    heads: int = 4
    groups: int = 8
    dropout: float = 0.0
    noise_scale: float = 100.0
    guidance_dim: int = 0

    def __post_init__(self) -> None:
        if any(c % self.groups for c in self.channels):
            raise ValueError(f"channels {self.channels} must be multiples of groups {self.groups}")
        if self.blocks < 1 or self.classes < 0 or self.emb_dim % 2:
            raise ValueError("blocks must be >= 1, classes >= 0 and emb_dim even")


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding [B, dim] of a real-valued input [B] (frequencies 1 .. 1e-4)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the embedding as a per-channel scale and shift."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = (
            self.qkv(self.norm(x)).reshape(b * self.heads, 3 * c // self.heads, h * w).chunk(3, 1)
        )
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c // self.heads), dim=-1)
        return x + self.out((v @ weights.transpose(1, 2)).reshape(b, c, h, w))


class UNet(nn.Module):
    """F(x, c_noise, cond): the EDM-preconditioned network body."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        cfg, self.config = config, config
        ch, emb = cfg.channels, cfg.emb_dim
        self.noise_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(cfg.classes + 1, emb) if cfg.classes else None
        self.guidance = nn.Linear(cfg.guidance_dim, emb) if cfg.guidance_dim else None
        if self.guidance is not None:  # zero at start: a student begins as its teacher
            nn.init.zeros_(self.guidance.weight)
            nn.init.zeros_(self.guidance.bias)
        self.emb_out = nn.Sequential(nn.SiLU(), nn.Linear(emb, emb))
        self.stem = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        def block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb, cfg.groups, cfg.dropout)

        self.down, self.downsample, skips, width = nn.ModuleList(), nn.ModuleList(), [ch[0]], ch[0]
        for level, c in enumerate(ch):
            blocks = nn.ModuleList()
            for _ in range(cfg.blocks):
                blocks.append(block(width, c))
                width = c
                skips.append(width)
            self.down.append(blocks)
            last = level == len(ch) - 1
            self.downsample.append(
                nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1)
            )
            if not last:
                skips.append(width)
        self.mid1, self.mid2 = block(width, width), block(width, width)
        self.mid_attn = Attention(width, cfg.heads, cfg.groups) if cfg.attention else nn.Identity()
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, c in reversed(list(enumerate(ch))):
            blocks = nn.ModuleList()
            for _ in range(cfg.blocks + 1):
                blocks.append(block(width + skips.pop(), c))
                width = c
            self.up.append(blocks)
            self.upsample.append(
                nn.Conv2d(width, width, 3, padding=1) if level > 0 else nn.Identity()
            )
        self.head = nn.Sequential(
            nn.GroupNorm(cfg.groups, width),
            nn.SiLU(),
            nn.Conv2d(width, cfg.in_channels, 3, padding=1),
        )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def embed(self, c_noise: Tensor, cond: Cond) -> Tensor:
        emb = self.noise_mlp(
            timestep_embedding(c_noise * self.config.noise_scale, self.config.emb_dim)
        )
        if self.label is not None:
            labels = None if cond is None else cond.get("label")
            if labels is None:
                labels = torch.full_like(c_noise, self.config.classes, dtype=torch.long)
            emb = emb + self.label(labels)
        if self.guidance is not None:
            if cond is None or "w_embedding" not in cond:
                raise ValueError("this network needs cond['w_embedding'] (guidance_dim > 0)")
            emb = emb + self.guidance(cond["w_embedding"].to(emb.dtype))
        return self.emb_out(emb)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond = None) -> Tensor:
        emb = self.embed(c_noise, cond)
        h = self.stem(x)
        skips = [h]
        for blocks, downsample in zip(self.down, self.downsample, strict=True):
            for b in blocks:
                h = b(h, emb)
                skips.append(h)
            if not isinstance(downsample, nn.Identity):
                h = downsample(h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for blocks, upsample in zip(self.up, self.upsample, strict=True):
            for b in blocks:
                h = b(torch.cat([h, skips.pop()], dim=1), emb)
            if not isinstance(upsample, nn.Identity):
                h = upsample(F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
        return self.head(h)
