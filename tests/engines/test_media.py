"""PNG encoding (engines/media.py): the pixels torch's formula gives, in PNGs any decoder
reads back exactly."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from engines.media import encode_images, raw_pixels, to_uint8


def torch_uint8(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return ((x - lo) * (255.0 / (hi - lo))).round().clamp(0, 255).to(torch.uint8)


def test_pixels_match_torchs_rounding_and_clipping():
    x = torch.randn(64, 3, 9, 7, generator=torch.Generator().manual_seed(0)) * 1.5
    x[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 1 / 255 - 1, 3 / 255 - 1])  # ties and the ends
    assert torch.equal(to_uint8(x, (-1.0, 1.0)), torch_uint8(x, -1.0, 1.0))


def test_pngs_decode_to_the_same_pixels():
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    rgb = torch.rand(2, 3, 5, 6)
    for batch, data_range in ((x, (-1.0, 1.0)), (rgb, (0.0, 1.0))):
        want = to_uint8(batch, data_range).numpy()
        for png, pixels, raw in zip(
            encode_images(batch, data_range), want, raw_pixels(batch, data_range), strict=True
        ):
            image = np.asarray(Image.open(io.BytesIO(png)))
            image = image[..., None] if image.ndim == 2 else image
            assert np.array_equal(image, pixels.transpose(1, 2, 0))
            assert raw == pixels.transpose(1, 2, 0).tobytes()
