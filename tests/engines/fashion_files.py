"""Write small Fashion-MNIST-format idx files, for tests that need data of a chosen shape."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte idx file: magic 0x0000 08 ndim, big-endian dims, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim])
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + dims + array.astype(np.uint8).tobytes()


def write_split(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    root.mkdir(parents=True, exist_ok=True)
    image_name, label_name = NAMES[split]
    (root / image_name).write_bytes(gzip.compress(idx_bytes(images)))
    (root / label_name).write_bytes(gzip.compress(idx_bytes(labels)))


def write_fake_fashion(root: Path, per_class: int = 20, seed: int = 0) -> Path:
    """Both splits with `per_class` random images of each of the 10 classes."""
    rng = np.random.default_rng(seed)
    for split in NAMES:
        labels = np.repeat(np.arange(10), per_class)
        base = rng.integers(0, 256, (10, 28, 28))
        noise = rng.integers(-40, 41, (len(labels), 28, 28))
        write_split(root, split, np.clip(base[labels] + noise, 0, 255), labels)
    return root
