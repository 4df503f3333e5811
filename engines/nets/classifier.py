"""A small CNN classifier for Fashion-MNIST: the quality harness's feature extractor.

`features` returns the penultimate activations (after the last hidden layer, before the
logits): Frechet distances are taken there, as FID takes them in Inception's pool layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class ClassifierConfig:
    """Sizes of the classifier; stored in its classifier.yaml."""

    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 128)
    features: int = 128
    classes: int = 10
    dropout: float = 0.3


class Classifier(nn.Module):
    """conv-BN-ReLU pairs per level with 2x2 pooling, then a hidden layer and the logits."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.in_channels
        for c in config.channels:
            layers += [
                nn.Conv2d(width, c, 3, padding=1),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.Conv2d(c, c, 3, padding=1),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            width = c
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.hidden = nn.Sequential(
            nn.Dropout(config.dropout), nn.Linear(width, config.features), nn.ReLU()
        )
        self.logits = nn.Sequential(
            nn.Dropout(config.dropout), nn.Linear(config.features, config.classes)
        )

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features [B, features] of images in [-1, 1]."""
        return self.hidden(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(self.features(x))
