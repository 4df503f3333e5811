"""The shipped reference models: each loads and samples in range; the classifier is sound;
conditional samples of the trained models are recognised by the shipped classifier."""

from pathlib import Path

import pytest
import torch

from engines import quality
from engines.data import load_fashion_mnist
from engines.repository import Repository

ROOT = Path(__file__).parents[2] / "model_repo"
TRAINED = {
    "fashion-edm": ("dpmpp_2m", 10),
    "fashion-cd": ("cm_multistep", 2),
    "fashion-latent-edm": ("dpmpp_2m", 10),
    "fashion-lcm": ("lcm", 4),
}


@pytest.fixture(scope="module")
def repo():
    return Repository(ROOT)


@pytest.fixture(scope="module")
def classifier():
    return quality.load_classifier(ROOT / "_classifiers" / "fashion-cnn")


def test_the_shipped_set_is_what_the_readme_lists(repo):
    assert set(repo.names()) >= {"fashion-gaussian", *(n for n in TRAINED if (ROOT / n).is_dir())}


@pytest.mark.parametrize(
    "name", sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("_"))
)
def test_every_shipped_model_loads_and_samples_the_right_shape_and_range(repo, name):
    model = repo.load(name)
    images, labels, nfe, _ = quality.generate(
        model, model.spec.sampling.default_sampler, model.spec.sampling.default_steps, n=4
    )
    assert images.shape == (4, 1, 28, 28) and labels.tolist() == [0, 1, 2, 3]
    assert nfe >= 1 and torch.isfinite(images).all()
    raw = model.decode(torch.zeros(1, *model.spec.shape))
    assert raw.shape == (1, *model.spec.image_shape) == (1, 1, 28, 28)
    for path in (ROOT / name).glob("*/*.safetensors"):
        assert path.stat().st_size < 20e6, f"{path} is over the 20 MB limit"


def test_the_shipped_classifier_is_accurate_on_held_out_images(classifier):
    x, y = load_fashion_mnist("test")
    _, preds = quality.embed(classifier, x[:2000])
    assert (preds == y[:2000]).float().mean() > 0.88


@pytest.mark.parametrize("name", [n for n in TRAINED if (ROOT / n).is_dir()])
def test_fixed_seed_samples_are_classified_as_asked_far_above_chance(repo, classifier, name):
    sampler, steps = TRAINED[name]
    images, labels, _, _ = quality.generate(repo.load(name), sampler, steps, n=30, seed=1234)
    _, preds = quality.embed(classifier, images)
    assert (preds == labels).float().mean() >= 0.6  # chance is 0.1
