"""Inference-time scaling: best_of picks the verifier's argmax, steering resamples
reproducibly and batch-invariantly, and the verifier section of model.yaml is strict."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from engines.data import fashion_root, load_fashion_mnist
from engines.noise import RowNoise
from engines.repository import Repository, RepositoryError
from engines.samplers import create, drive, drive_many
from engines.sampling import start_sampler
from engines.scaling import Choice, Search, ancestors, candidate_seeds, check, resample_points
from engines.schedules import karras_sigmas
from engines.verifiers import VerifierConfig, load_verifier
from tests.service.conftest import elementwise, toy_model

ROOT = Path(__file__).parents[2] / "model_repo"


def fixture_model():
    return toy_model("toy", denoiser=elementwise)


class MeanVerifier:
    """Fixture verifier: the lighter the sample, the better (no labels needed)."""

    name = "fixture:mean"
    needs_labels = False

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def score(self, x0, labels):
        self.calls.append(x0.clone())
        return x0.double().flatten(1).mean(1)


def run(model, sampler, steps, seed, n, k, every=0, scale=1.0, verifier=None, label=0):
    """Sample n images with k candidates (or particles); (images, choice)."""
    verifier = verifier or MeanVerifier()
    labels = torch.full((n * k,), label)
    choice = Choice()
    gen, cond, _ = start_sampler(
        model,
        sampler,
        steps,
        candidate_seeds(seed, n, k),
        labels,
        search=Search(k, every, scale),
        verify=lambda x0: verifier.score(x0, labels),
        choice=choice,
    )
    return drive(gen, model.denoiser, cond), choice


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])
def test_best_of_returns_each_images_argmax_and_its_seed_remakes_it(sampler):
    model = fixture_model()
    n, k, seed = 3, 4, 11
    seeds = candidate_seeds(seed, n, k)
    labels = torch.zeros(n * k, dtype=torch.long)
    gen, cond, _ = start_sampler(model, sampler, 4, seeds, labels)
    every = drive(gen, model.denoiser, cond)
    scores = every.flatten(1).mean(1).view(n, k)
    best, choice = run(model, sampler, 4, seed, n, k)
    want = torch.arange(n) * k + scores.argmax(1)
    assert choice.rows == want.tolist()
    assert torch.equal(best, every[want])
    assert choice.scores == pytest.approx(scores.max(1).values.tolist())
    # a plain one-image request with the chosen candidate's seed makes the same image
    for i, row in enumerate(choice.rows):
        alone, alone_cond, _ = start_sampler(model, sampler, 4, [seeds[row]], labels[:1])
        assert torch.equal(drive(alone, model.denoiser, alone_cond), best[i : i + 1])


def test_candidate_seeds_are_image_major_and_candidate_zero_is_the_plain_seed():
    assert candidate_seeds(100, 2, 3) == [100, 102, 104, 101, 103, 105]
    assert candidate_seeds(100, 2, 1) == [100, 101]


@pytest.mark.parametrize("sampler", ["cm_multistep", "dpmpp_2m", "euler"])
def test_steering_is_reproducible_and_batch_invariant(sampler):
    model = fixture_model()
    first, c1 = run(model, sampler, 6, 5, 2, 4, every=2)
    again, c2 = run(model, sampler, 6, 5, 2, 4, every=2)
    assert torch.equal(first, again) and c1 == c2 and c1.resamples >= 2
    # the same request, batched with an unrelated one in every forward pass
    labels = torch.zeros(8, dtype=torch.long)
    verifier = MeanVerifier()
    choice = Choice()
    gen, cond, _ = start_sampler(
        model,
        sampler,
        6,
        candidate_seeds(5, 2, 4),
        labels,
        search=Search(4, 2, 1.0),
        verify=lambda x0: verifier.score(x0, labels),
        choice=choice,
    )
    other = create(
        "euler_ancestral", torch.randn(3, 1, 4, 4) * 80, karras_sigmas(9), RowNoise([1, 2, 3])
    )
    other_cond = {"label": torch.ones(3, dtype=torch.long)}
    batched, _ = drive_many([gen, other], model.denoiser, [cond, other_cond])
    assert torch.equal(batched, first) and choice == c1


def test_steering_resamples_towards_the_verifier():
    """With a huge lambda every image's particles become copies of its best one at the
    first resampling; an ODE sampler then keeps them identical to the end."""
    model = fixture_model()
    verifier = MeanVerifier()
    _, choice = run(model, "dpmpp_2m", 5, 3, 2, 4, every=2, scale=1e9, verifier=verifier)
    final = verifier.calls[-1].view(2, 4, -1)
    assert choice.resamples == 2
    assert all(torch.equal(final[i, 0], final[i, j]) for i in range(2) for j in range(4))
    # without steering the same seeds give four different candidates per image
    plain = MeanVerifier()
    run(model, "dpmpp_2m", 5, 3, 2, 4, verifier=plain)
    assert not torch.equal(
        plain.calls[-1].view(2, 4, -1)[0, 0], plain.calls[-1].view(2, 4, -1)[0, 1]
    )


def test_ancestors_follow_the_weights_and_stay_in_their_image():
    scores = torch.tensor([0.0, 0.0, 50.0, 0.0, 50.0, 0.0, 0.0, 0.0])
    rows = ancestors(scores, 2, 4, 1.0, torch.Generator().manual_seed(0))
    assert rows.tolist() == [2, 2, 2, 2, 4, 4, 4, 4]
    even = ancestors(torch.zeros(400), 100, 4, 1.0, torch.Generator().manual_seed(0))
    assert ((even // 4) == torch.arange(100).repeat_interleave(4)).all()
    assert len(set((even % 4).tolist())) == 4


def test_what_steering_cannot_do_is_said():
    assert resample_points("dpmpp_2m", 4, 1) == [0, 1, 2]  # never after the last step
    assert resample_points("dpmpp_3m", 4, 1) == [0, 1]  # a 3M restart needs 3 steps left
    assert resample_points("cm_multistep", 4, 2) == [1]
    assert resample_points("cm_multistep", 2, 1) == [0]
    steer = Search(4, 1)
    assert "teleport" in check(steer, "dpmpp_2m", 8, True)
    assert "one evaluation per step" in check(steer, "heun", 8, False)
    assert "never resamples" in check(Search(4, 4), "cm_multistep", 4, False)
    assert check(Search(4, 0), "heun", 1, True) is None  # best_of works with anything


def test_the_shipped_classifier_verifier_prefers_the_true_class():
    spec = Repository(ROOT).spec("fashion-cd")
    verifier = load_verifier(spec.verifier, ROOT, spec)
    x, y = load_fashion_mnist("test", fashion_root(None))
    x, y = x[:200], y[:200]
    right = verifier.score(x, y)
    wrong = verifier.score(x, (y + 1) % 10)
    assert right.shape == (200,) and (right <= 0).all()
    assert (right > wrong).float().mean() > 0.85


@pytest.fixture
def cd_copy(tmp_path) -> Path:
    folder = tmp_path / "repo" / "fashion-cd"
    shutil.copytree(ROOT / "fashion-cd", folder)
    return folder


def set_verifier(folder: Path, value) -> None:
    path = folder / "model.yaml"
    data = yaml.safe_load(path.read_text())
    data["verifier"] = value
    path.write_text(yaml.safe_dump(data))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"name": "clip"}, "verifier.name must be one of ['classifier']"),
        ({"name": "classifier", "max_candidates": 0}, "max_candidates must be an integer in"),
        ({"name": "classifier", "max_candidates": 65}, "max_candidates must be an integer in"),
        ({"name": "classifier", "potential_scale": 0}, "potential_scale must be a number"),
        ({"name": "classifier", "clasifier": "x"}, "unknown key verifier.clasifier"),
        ({"name": "classifier", "classifier": "../x"}, "verifier.classifier must be the name"),
        ("classifier", "verifier must be a mapping of keys to values"),
    ],
)
def test_the_verifier_section_is_checked_strictly(cd_copy, value, message):
    set_verifier(cd_copy, value)
    with pytest.raises(RepositoryError) as err:
        Repository(cd_copy.parent)
    assert message in str(err.value) and "model.yaml" in str(err.value)


def test_verifier_defaults_absence_and_a_missing_classifier(cd_copy):
    set_verifier(cd_copy, {"name": "classifier"})
    repo = Repository(cd_copy.parent)
    assert repo.spec("fashion-cd").verifier == VerifierConfig("classifier")
    with pytest.raises(RepositoryError, match=r"_classifiers/fashion-cnn/classifier\.yaml"):
        repo._verifier(repo.spec("fashion-cd"))  # the copy has no _classifiers folder
    set_verifier(cd_copy, None)
    assert Repository(cd_copy.parent).spec("fashion-cd").verifier is None


def test_a_classifier_verifier_needs_labels_and_matching_classes(cd_copy, tmp_path):
    spec = Repository(ROOT).spec("fashion-cd")
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        load_verifier(spec.verifier, ROOT, replace(spec, labels=()))
    with pytest.raises(ValueError, match="do not match the model's labels"):
        load_verifier(spec.verifier, ROOT, replace(spec, labels=tuple(reversed(spec.labels))))


def test_bench_cells_parse_and_refuse_what_they_cannot_mean():
    from engines.scaling_bench import Spec

    assert Spec.parse("plain:4") == Spec("plain", 1, 4, 0)
    assert Spec.parse("best_of:4x1") == Spec("best_of", 4, 1, 0)
    assert Spec.parse("steering:2x2/1") == Spec("steering", 2, 2, 1)
    for bad in ("plain:2x2", "best_of:2x2/1", "steering:2x2", "beam:2x2", "best_of:"):
        with pytest.raises(ValueError, match="cell"):
            Spec.parse(bad)
