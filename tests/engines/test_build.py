"""`fewstep build gaussian` end to end, on a small data set in the Fashion-MNIST format."""

import pytest

from engines.build import build_gaussian, denoising_mse
from engines.data import load_fashion_mnist
from engines.repository import Repository
from tests.engines.fashion_files import write_fake_fashion


def test_build_writes_a_package_the_repository_loads(tmp_path):
    data = write_fake_fashion(tmp_path / "data", per_class=12)
    lines: list[str] = []
    model = build_gaussian(
        data, rank=6, out=tmp_path / "repo" / "tiny", version=3, log=lines.append
    )

    loaded = Repository(tmp_path / "repo").load("tiny", 3)
    assert loaded.fingerprint == model.fingerprint and loaded.gaussian.eigvals.shape == (10, 6)
    assert loaded.gaussian.eigvecs.shape == (10, 784, 6)
    card = (tmp_path / "repo" / "tiny" / "3" / "MODEL_CARD.md").read_text()
    assert f"--rank 6 --out {tmp_path / 'repo' / 'tiny'} --version 3" in card
    assert model.fingerprint in card
    test_x, test_y = load_fashion_mnist("test", data)
    for sigma in (0.5, 2.0):  # the card's quality table is what the served model measures
        row = next(line for line in card.splitlines() if line.startswith(f"| {sigma} |"))
        measured = denoising_mse(loaded.denoiser, test_x, test_y, sigma)
        assert row.split("|")[2].strip() == f"{measured:.4f}"
    assert any("fitting per-class mean" in line for line in lines)
    assert any("MODEL_CARD.md" in line for line in lines[-1:])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"rank": 0}, r"rank must be in 1\.\.784"), ({"version": 0}, "version must be a positive")],
)
def test_build_rejects_bad_rank_and_version(tmp_path, kwargs, message):
    data = write_fake_fashion(tmp_path / "data", per_class=3)
    with pytest.raises(ValueError, match=message):
        build_gaussian(data, out=tmp_path / "repo" / "tiny", log=lambda _: None, **kwargs)
