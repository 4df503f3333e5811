"""PNG encoding (engines/media.py): the pixels torch's formula gives, in PNGs any decoder
reads back exactly."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from engines.media import encode_images, encode_png, raw_pixels, to_uint8


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


def test_every_chunk_checks_out_and_the_bytes_are_deterministic():
    """PIL's verify() checks each chunk's CRC; RGBA and a single image via encode_png too."""
    rgba = (torch.rand(4, 7, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    png = encode_png(rgba)
    assert png == encode_png(rgba.clone())
    Image.open(io.BytesIO(png)).verify()
    image = np.asarray(Image.open(io.BytesIO(png)))
    assert image.shape == (7, 3, 4) and np.array_equal(image, rgba.permute(1, 2, 0).numpy())
    batch = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 2 - 1
    for one in encode_images(batch, (-1.0, 1.0)):
        Image.open(io.BytesIO(one)).verify()
