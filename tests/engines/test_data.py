"""The Fashion-MNIST loader: the real Debian files, and hand-made broken ones."""

import gzip
import lzma

import numpy as np
import pytest
import torch

from engines.data import (
    FASHION_LABELS,
    ROOT_ENV,
    DataFormatError,
    DataMissingError,
    load_fashion_mnist,
)
from tests.engines.fashion_files import idx_bytes, write_split


def test_real_test_split_has_the_published_shape_range_and_balance():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10_000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (10_000,) and labels.dtype == torch.int64
    assert images.min() == -1 and images.max() == 1
    assert labels.bincount().tolist() == [1000] * 10
    assert len(FASHION_LABELS) == 10


def test_real_train_split_has_60k_balanced_images():
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60_000, 1, 28, 28)
    assert labels.bincount().tolist() == [6000] * 10
    # trousers fill a narrow column; bags and coats fill the frame: a check on label order
    mean_ink = torch.stack([(images[labels == c] > -0.9).float().mean() for c in range(10)])
    assert mean_ink[FASHION_LABELS.index("trouser")] < mean_ink[FASHION_LABELS.index("coat")]


def test_pixels_are_scaled_from_bytes_to_minus_one_one(tmp_path):
    pixels = np.zeros((3, 28, 28), dtype=np.uint8)
    pixels[1], pixels[2, 0, 0] = 255, 51
    write_split(tmp_path, "train", pixels, np.array([9, 0, 4]))
    images, labels = load_fashion_mnist("train", root=tmp_path)
    assert labels.tolist() == [9, 0, 4]
    assert images[0].unique().tolist() == [-1.0] and images[1].unique().tolist() == [1.0]
    assert images[2, 0, 0, 0].item() == pytest.approx(51 / 127.5 - 1)


def test_xz_copies_are_read_where_the_gz_files_are_absent(tmp_path):
    pixels = np.full((2, 28, 28), 255, dtype=np.uint8)
    write_split(tmp_path, "test", pixels, np.array([3, 7]))
    for path in tmp_path.glob("*.gz"):
        path.with_suffix(".xz").write_bytes(lzma.compress(gzip.decompress(path.read_bytes())))
        path.unlink()
    images, labels = load_fashion_mnist("test", root=tmp_path)
    assert labels.tolist() == [3, 7] and images.unique().tolist() == [1.0]
    (tmp_path / "t10k-labels-idx1-ubyte.xz").write_bytes(b"not xz")
    with pytest.raises(DataFormatError, match="is not a readable xz file"):
        load_fashion_mnist("test", root=tmp_path)


def test_missing_files_say_how_to_install_them(tmp_path, monkeypatch):
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    with pytest.raises(DataMissingError) as err:
        load_fashion_mnist("test")
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in message
    assert "apt-get install dataset-fashion-mnist" in message and ROOT_ENV in message


def test_unknown_split_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*\['test', 'train'\]"):
        load_fashion_mnist("validation")


def _broken(tmp_path, image_file: bytes | None, labels: np.ndarray):
    write_split(tmp_path, "test", np.zeros((2, 28, 28), dtype=np.uint8), labels)
    if image_file is not None:
        (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(image_file)
    return tmp_path


@pytest.mark.parametrize(
    ("image_file", "labels", "message"),
    [
        (b"not gzip at all", np.arange(2), "not a readable gzip file"),
        (gzip.compress(b"\0\0\x08\x03\0\0"), np.arange(2), "too short for an idx header"),
        (gzip.compress(idx_bytes(np.zeros(5))), np.arange(2), "magic number 00000801"),
        (gzip.compress(idx_bytes(np.zeros((2, 28, 28)))[:-10]), np.arange(2), "truncated"),
        (gzip.compress(idx_bytes(np.zeros((2, 32, 32)))), np.arange(2), "expected (28, 28)"),
        (None, np.arange(3), "2 test images but 3 labels"),
        (None, np.array([3, 10]), "label 10 is outside 0..9"),
    ],
    ids=["gzip", "short", "magic", "truncated", "size", "count", "label"],
)
def test_corrupt_files_are_rejected_with_the_reason(tmp_path, image_file, labels, message):
    with pytest.raises(DataFormatError) as err:
        load_fashion_mnist("test", root=_broken(tmp_path, image_file, labels))
    assert message in str(err.value) and str(tmp_path) in str(err.value)
