"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (gzipped idx files).

The files are read from a local folder and never downloaded: the root is the `root`
argument, else $FEWSTEP_FASHION_MNIST, else /usr/share/datasets/fashion-mnist.
"""

from __future__ import annotations

import gzip
import lzma
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FASHION_LABELS: tuple[str, ...] = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ROOT_ENV = "FEWSTEP_FASHION_MNIST"
SPLITS = {"train": "train", "test": "t10k"}
_UBYTE = 0x08


class DataMissingError(FileNotFoundError):
    """A data file is not where the loader looks for it."""


class DataFormatError(ValueError):
    """A data file exists but is not a well-formed idx file of the expected kind."""


def fashion_root(root: str | Path | None = None) -> Path:
    """The folder the loader reads: `root`, else $FEWSTEP_FASHION_MNIST, else the Debian path."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read a gzipped idx file of unsigned bytes with `ndim` dimensions; an xz-compressed
    copy beside it (`name.xz` for `name.gz`) is read when the .gz file is absent."""
    if not path.is_file() and path.with_suffix(".xz").is_file():
        path = path.with_suffix(".xz")
    if not path.is_file():
        raise DataMissingError(
            f"{path} not found; install it with `apt-get install dataset-fashion-mnist`, "
            f"or point {ROOT_ENV} at a folder holding the four Fashion-MNIST .gz files"
        )
    xz = path.suffix == ".xz"
    try:
        raw = (lzma.decompress if xz else gzip.decompress)(path.read_bytes())
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as err:
        kind = "xz" if xz else "gzip"
        raise DataFormatError(f"{path} is not a readable {kind} file ({err})") from None
    if raw[:4] != bytes([0, 0, _UBYTE, ndim]):
        raise DataFormatError(
            f"{path}: magic number {raw[:4].hex()} is not that of a {ndim}-d unsigned-byte idx "
            f"file (expected 0000{_UBYTE:02x}{ndim:02x}); the file is corrupt or of another kind"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: {len(raw)} bytes is too short for an idx header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != math.prod(dims):
        raise DataFormatError(
            f"{path}: header promises {dims} = {math.prod(dims)} values, "
            f"the file holds {len(raw) - header}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(
    split: str = "train", root: str | Path | None = None
) -> tuple[Tensor, Tensor]:
    """Images float32 [N, 1, 28, 28] in [-1, 1] and labels int64 [N] of one split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    folder, prefix = fashion_root(root), SPLITS[split]
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 3)
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 1)
    if images.shape[1:] != (28, 28):
        raise DataFormatError(f"{folder}: images are {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise DataFormatError(
            f"{folder}: {len(images)} {split} images but {len(labels)} labels; "
            "the files come from different releases or one is corrupt"
        )
    if len(labels) and labels.max() >= len(FASHION_LABELS):
        raise DataFormatError(
            f"{folder}: label {labels.max()} is outside 0..{len(FASHION_LABELS) - 1}"
        )
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1) / 127.5 - 1
    return x, torch.from_numpy(labels.astype(np.int64))
