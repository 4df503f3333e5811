"""Image encoding: samples in the model's data range -> 8-bit PNG bytes or raw pixels."""

from __future__ import annotations

import struct
import zlib

import torch
from torch import Tensor


def to_uint8(x: Tensor, data_range: tuple[float, float]) -> Tensor:
    """Map [lo, hi] to 0..255 with rounding; values outside are clipped."""
    lo, hi = data_range
    scaled = (x.to(torch.float32) - lo) * (255.0 / (hi - lo))
    return scaled.round().clamp(0, 255).to(torch.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(pixels: Tensor) -> bytes:
    """PNG of a uint8 image [C, H, W] with C = 1 (grey), 3 (RGB) or 4 (RGBA).

    Deterministic: the same pixels always give the same bytes.
    """
    if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[0] not in (1, 3, 4):
        raise ValueError(
            f"expected a uint8 [C, H, W] image with C in 1, 3, 4, got {tuple(pixels.shape)}"
        )
    channels, height, width = pixels.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = pixels.permute(1, 2, 0).reshape(height, width * channels).contiguous()
    raw = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), rows], dim=1).numpy().tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )


def encode_images(x: Tensor, data_range: tuple[float, float]) -> list[bytes]:
    """One PNG per row of a batch [B, C, H, W]."""
    pixels = to_uint8(x.detach().cpu(), data_range)
    return [encode_png(p) for p in pixels]


def raw_pixels(x: Tensor, data_range: tuple[float, float]) -> list[bytes]:
    """One uint8 buffer [H, W, C] (channels last) per row of a batch [B, C, H, W]: the
    pixels encode_images would put into each PNG, unencoded."""
    pixels = to_uint8(x.detach().cpu(), data_range).permute(0, 2, 3, 1).contiguous()
    return [p.numpy().tobytes() for p in pixels]


# output format -> (encoder, media type of the bytes it makes)
ENCODINGS = {
    "png": (encode_images, "image/png"),
    "raw": (raw_pixels, "application/octet-stream"),
}
