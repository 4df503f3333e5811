"""A small convolutional autoencoder, 28x28 images <-> 4x7x7 latents, for latent models.

`scale` multiplies encoder outputs so the latents of the training set have unit variance
(Rombach et al. 2022's scale factor); decode divides by it again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass(frozen=True)
class AutoencoderConfig:
    """Sizes of the autoencoder; stored in model.yaml under `autoencoder`."""

    in_channels: int = 1
    latent_channels: int = 4
    channels: tuple[int, ...] = (32, 64)
    groups: int = 8
    scale: float = 1.0

    def decoded_shape(self, latent: tuple[int, ...]) -> tuple[int, ...]:
        """[C, H, W] the decoder makes of a [latent_channels, h, w] latent."""
        factor = 2 ** len(self.channels)
        return (self.in_channels, latent[-2] * factor, latent[-1] * factor)


class _Res(nn.Module):
    def __init__(self, c: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(groups, c),
            nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.GroupNorm(groups, c),
            nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Autoencoder(nn.Module):
    """Deterministic autoencoder; each channel level halves the resolution (28 -> 14 -> 7)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        ch, g = config.channels, config.groups
        enc: list[nn.Module] = [nn.Conv2d(config.in_channels, ch[0], 3, padding=1)]
        width = ch[0]
        for c in ch:
            enc += [nn.Conv2d(width, c, 3, stride=2, padding=1), _Res(c, g)]
            width = c
        enc += [nn.GroupNorm(g, width), nn.SiLU(), nn.Conv2d(width, config.latent_channels, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(config.latent_channels, width, 3, padding=1)]
        for c in reversed(ch):
            dec += [
                _Res(width, g),
                nn.Upsample(scale_factor=2.0),
                nn.Conv2d(width, c, 3, padding=1),
            ]
            width = c
        dec += [
            nn.GroupNorm(g, width),
            nn.SiLU(),
            nn.Conv2d(width, config.in_channels, 3, padding=1),
        ]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] -> scaled latents."""
        return self.encoder(x) * self.config.scale

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents -> images (tanh keeps them in [-1, 1])."""
        return torch.tanh(self.decoder(z / self.config.scale))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def reconstruction_loss(model: Autoencoder, x: Tensor, latent_penalty: float = 1e-4) -> Tensor:
    """L1 + L2 reconstruction, with a small penalty that keeps latents near the origin."""
    z = model.encoder(x)
    out = torch.tanh(model.decoder(z))
    return F.l1_loss(out, x) + F.mse_loss(out, x) + latent_penalty * z.square().mean()
