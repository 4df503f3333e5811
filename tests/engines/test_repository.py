"""The model repository: model.yaml validation, loading, and the shipped fashion-gaussian."""

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from engines.data import FASHION_LABELS, load_fashion_mnist
from engines.gaussian import GaussianStats
from engines.noise import RowNoise, row_seeds
from engines.repository import ModelNotFoundError, Repository, RepositoryError
from engines.samplers import INFO, create, drive
from engines.schedules import karras_sigmas, teleport_sigmas

SHIPPED = Path(__file__).parents[2] / "model_repo"
PACKAGE = SHIPPED / "fashion-gaussian"
DELETE = object()


@pytest.fixture(scope="module")
def shipped():
    repo = Repository(SHIPPED)
    return repo, repo.load("fashion-gaussian")


@pytest.fixture
def copy(tmp_path) -> Path:
    """A copy of the shipped package in tmp_path/repo/fashion-gaussian; returns its folder."""
    folder = tmp_path / "repo" / "fashion-gaussian"
    shutil.copytree(PACKAGE, folder)
    return folder


def rewrite(folder: Path, dotted: str, value) -> Path:
    """Set (or delete) one field of folder/model.yaml, e.g. 'sampling.rho'."""
    path = folder / "model.yaml"
    data = yaml.safe_load(path.read_text())
    *parents, key = dotted.split(".")
    target = data
    for parent in parents:
        target = target[parent]
    if value is DELETE:
        del target[key]
    else:
        target[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


KIND_NAMES = "['cm', 'edm', 'gaussian', 'lcm', 'speech']"
BAD_FIELDS = [
    ("kind", "vae", f"kind must be one of {KIND_NAMES}, got 'vae'"),
    ("kind", DELETE, f"kind is missing; it must be one of {KIND_NAMES}"),
    ("network", {"channels": [16]}, "network must be absent: a 'gaussian' model has no network"),
    ("description", "  ", "description must be a non-empty string"),
    ("description", 3, "description must be a non-empty string, got 3"),
    ("shape", [1, 28, -28], "shape must be a non-empty list of positive integers"),
    ("shape", "1x28x28", "shape must be a non-empty list of positive integers"),
    ("shape", [], "shape must be a non-empty list of positive integers"),
    ("labels", ["bag", "Bag"], "labels must be a list of distinct non-empty class names"),
    ("labels", "bag", "labels must be a list of distinct non-empty class names"),
    ("synonyms", ["pants"], "synonyms must be a mapping of synonym -> label"),
    ("synonyms", {"Pants": "trouser"}, "synonyms['Pants'] must be keyed by a lower-case"),
    ("synonyms", {"pants": "trousers"}, "synonyms['pants'] must be one of labels"),
    ("synonyms", {"coat": "dress"}, "synonyms['coat'] must be 'coat', the label it spells"),
    ("data_range", [1, -1], "data_range must be [low, high]: two numbers with low < high"),
    ("data_range", [0, 1, 2], "data_range must be [low, high]"),
    ("data_range", [0, ".5"], "data_range must be [low, high]"),
    ("max_batch_size", 0, "max_batch_size must be an integer >= 1, got 0"),
    ("max_batch_size", True, "max_batch_size must be an integer >= 1, got True"),
    ("max_n", 2.5, "max_n must be an integer >= 1, got 2.5"),
    ("max_n", DELETE, "max_n is missing; it must be an integer >= 1"),
    ("default_version", 2, "default_version must be one of the version folders [1], got 2"),
    ("sampling", None, "sampling must be a mapping of keys to values, got None"),
    ("sampling", DELETE, "sampling is missing"),
    ("sampling.samplers", [], "sampling.samplers must be a non-empty list of distinct sampler"),
    ("sampling.samplers", ["heun", "heun"], "sampling.samplers must be a non-empty list of dis"),
    ("sampling.samplers", ["heun", "warp"], "sampling.samplers[1] must be a sampler name"),
    ("sampling.samplers", ["teleport"], "sampling.samplers[0] must be a sampler name, one of"),
    ("sampling.samplers", ["heun", "lcm"], "samplers[1] must be a sampler that fits a 'gaussian'"),
    ("sampling.samplers", ["euler_cfgpp"], "sampling.samplers[0] must be a sampler that fits"),
    ("sampling.default_sampler", "heun2", "sampling.default_sampler must be one of sampling.sa"),
    ("sampling.default_sampler", DELETE, "sampling.default_sampler is missing"),
    (
        "sampling.default_steps",
        "eight",
        "sampling.default_steps must be an integer in 2..max_steps (50), got 'eight'",
    ),
    ("sampling.default_steps", 51, "sampling.default_steps must be an integer in 2..max_steps"),
    ("sampling.default_steps", 1, "sampling.default_steps must be an integer in 2..max_steps"),
    ("sampling.max_steps", 2, "sampling.max_steps must be an integer in 3..1000, got 2"),
    ("sampling.max_steps", 5000, "sampling.max_steps must be an integer in 3..1000"),
    ("sampling.sigma_min", 0, "sampling.sigma_min must be a number > 0, got 0"),
    ("sampling.sigma_min", "2e-3", "sampling.sigma_min must be a number > 0, got '2e-3'"),
    ("sampling.sigma_max", 0.001, "sampling.sigma_max must be a number > sigma_min (0.002)"),
    ("sampling.sigma_max", float("inf"), "sampling.sigma_max must be a number > sigma_min"),
    ("sampling.rho", -7, "sampling.rho must be a number > 0, got -7"),
    ("sampling.teleport_sigma", 80, "sampling.teleport_sigma must be null or a number strictly"),
    ("sampling.teleport_sigma", DELETE, "sampling.teleport_sigma is missing"),
    ("sampling.default_guidance", 7.5, "sampling.default_guidance must be 1.0: a 'gaussian'"),
    ("sampling.max_guidance", 2, "sampling.max_guidance must be 1.0: a 'gaussian' model has no"),
    ("max_batch", 8, "unknown key max_batch (did you mean max_batch_size?)"),
    ("sampling.sampler", "euler", "unknown key sampling.sampler (did you mean sampling.samplers"),
]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    BAD_FIELDS,
    ids=[f"{f}={'<deleted>' if v is DELETE else v!r}" for f, v, _ in BAD_FIELDS],
)
def test_every_field_is_checked_and_the_error_names_file_and_field(copy, field, value, message):
    shutil.rmtree(copy / "1")
    (copy / "1").mkdir()  # validation needs a version folder, not its files
    path = rewrite(copy, field, value)
    with pytest.raises(RepositoryError) as err:
        Repository(copy.parent)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_teleport_sigma_may_be_null_and_default_version_picks_among_versions(copy):
    rewrite(copy, "sampling.teleport_sigma", None)
    shutil.copytree(copy / "1", copy / "2")
    repo = Repository(copy.parent)
    assert repo.default_version("fashion-gaussian") == 2
    assert [s.version for s in repo.specs()] == [1, 2]
    assert repo.specs()[0].sampling.teleport_sigma is None
    rewrite(copy, "default_version", 1)
    assert Repository(copy.parent).default_version("fashion-gaussian") == 1


@pytest.mark.parametrize(
    ("arrange", "message"),
    [
        (lambda f: (f / "model.yaml").unlink(), "a model folder needs a model.yaml"),
        (lambda f: (f / "1").rename(f / "v1"), "version folders are named 1, 2, 3"),
        (lambda f: (f / "1").rename(f / "01"), "version folders are named 1, 2, 3"),
        (lambda f: shutil.rmtree(f / "1"), "no version folder (1/, 2/, ...) to serve"),
        (lambda f: f.rename(f.parent / "Fashion"), "model names use lower-case letters"),
        (lambda f: (f / "model.yaml").write_text("kind: [unclosed"), "not a readable YAML file"),
        (lambda f: (f / "model.yaml").write_text("- kind"), "the file must be a mapping"),
    ],
    ids=["no-yaml", "v1", "01", "no-version", "name", "syntax", "list"],
)
def test_broken_folders_are_rejected_when_the_repository_opens(copy, arrange, message):
    arrange(copy)
    with pytest.raises(RepositoryError, match=re.escape(message)):
        Repository(copy.parent)


def test_missing_repository_and_unknown_models(tmp_path, shipped):
    with pytest.raises(RepositoryError, match="model repository folder not found"):
        Repository(tmp_path / "nowhere")
    repo, _ = shipped
    with pytest.raises(ModelNotFoundError, match=r"no model 'mnist'; .*'fashion-gaussian'"):
        repo.load("mnist")
    with pytest.raises(ModelNotFoundError, match=r"has no version 7; it has \[1\]"):
        repo.load("fashion-gaussian", 7)


def _mismatch_shape(folder: Path) -> None:
    rewrite(folder, "shape", [1, 784])


def _rename_label(folder: Path) -> None:
    labels = list(FASHION_LABELS)
    labels[8] = "handbag"
    rewrite(folder, "synonyms", {})
    rewrite(folder, "labels", labels)


@pytest.mark.parametrize(
    ("arrange", "message"),
    [
        (lambda f: (f / "1" / "stats.safetensors").unlink(), "stats.safetensors not found"),
        (
            lambda f: (f / "1" / "stats.safetensors").write_bytes(b"\x08" + bytes(40)),
            "unreadable Gaussian statistics",
        ),
        (_mismatch_shape, "shaped [1, 28, 28], but model.yaml says shape [1, 784]"),
        (_rename_label, "but model.yaml says labels ['t-shirt/top'"),
    ],
    ids=["missing", "corrupt", "shape", "labels"],
)
def test_load_rejects_statistics_that_disagree_with_model_yaml(copy, arrange, message):
    arrange(copy)
    with pytest.raises(RepositoryError) as err:
        Repository(copy.parent).load("fashion-gaussian")
    text = str(err.value)
    assert message in text and "rebuild it with `fewstep build gaussian`" in text


@pytest.mark.parametrize(
    ("prompt", "label"),
    [
        ("trouser", 1),
        (" TROUSERS ", 1),
        ("Pants", 1),
        ("t-shirt/top", 0),
        ("tee", 0),
        ("Ankle Boot", 9),
        ("ankle  boot", 9),
        ("ankle-boot", 9),
        ("purse", 8),
        ("Trainers", 7),
        ("jumper", 2),
        ("cat", None),
        ("", None),
        ("trousers please", None),
    ],
)
def test_label_id_matches_labels_and_synonyms(shipped, prompt, label):
    assert shipped[0].specs()[0].label_id(prompt) == label


def test_shipped_package_matches_its_spec_and_card(shipped):
    repo, model = shipped
    assert "fashion-gaussian" in repo.names() and repo.default_version("fashion-gaussian") == 1
    spec = model.spec
    assert (spec.name, spec.version, spec.kind) == ("fashion-gaussian", 1, "gaussian")
    assert spec.labels == FASHION_LABELS and spec.shape == (1, 28, 28)
    assert spec.data_range == (-1.0, 1.0) and (spec.max_batch_size, spec.max_n) == (256, 16)
    s = spec.sampling
    assert all(INFO[name].family in ("ode", "sde") for name in s.samplers) and len(s.samplers) == 10
    assert (s.default_sampler, s.default_steps, s.max_steps) == ("dpmpp_2m", 8, 50)
    assert (s.sigma_min, s.sigma_max, s.rho, s.teleport_sigma) == (0.002, 80.0, 7.0, 10.0)
    assert (s.default_guidance, s.max_guidance) == (1.0, 1.0)
    assert isinstance(model.gaussian, GaussianStats) and model.runtime == "torch"
    assert (PACKAGE / "1" / "stats.safetensors").stat().st_size < 10e6
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", model.fingerprint)
    card = (PACKAGE / "1" / "MODEL_CARD.md").read_text()
    assert f"fingerprint `{model.fingerprint}`" in card
    assert f"--rank {model.gaussian.eigvals.shape[1]}" in card


def test_fingerprint_is_stable_and_follows_the_bytes(shipped, copy):
    _, model = shipped
    assert Repository(SHIPPED).load("fashion-gaussian").fingerprint == model.fingerprint
    assert Repository(copy.parent).load("fashion-gaussian").fingerprint == model.fingerprint
    (copy / "1" / "MODEL_CARD.md").write_text("edited card")  # documentation is not hashed
    assert Repository(copy.parent).load("fashion-gaussian").fingerprint == model.fingerprint
    stats = copy / "1" / "stats.safetensors"
    data = bytearray(stats.read_bytes())
    data[-1] ^= 1  # one bit of the last float
    stats.write_bytes(bytes(data))
    assert Repository(copy.parent).load("fashion-gaussian").fingerprint != model.fingerprint


def test_warmup_runs_the_denoiser(shipped):
    seconds = shipped[1].warmup((1, 8))
    assert 0 < seconds < 5


def _sample(model, per_class: int, name: str = "dpmpp_2m", teleport: bool = False):
    s = model.spec.sampling
    labels = torch.arange(10).repeat_interleave(per_class)
    noise = RowNoise(row_seeds(1234, len(labels)))
    sigmas = karras_sigmas(8, s.sigma_min, s.sigma_max, s.rho)
    opts = {}
    if teleport:
        follower = karras_sigmas(8, s.sigma_min, s.teleport_sigma, s.rho)
        sigmas, opts = teleport_sigmas(s.sigma_max, follower), {"then": name}
        opts.update(gaussian=model.gaussian, labels=labels)
        name = "teleport"
    x = noise.randn((len(labels), *model.spec.shape)) * float(sigmas[0])
    return drive(create(name, x, sigmas, noise, **opts), model.denoiser, {"label": labels}), labels


@pytest.mark.parametrize("teleport", [False, True], ids=["dpmpp_2m", "teleport+dpmpp_2m"])
def test_samples_have_the_shape_and_range_of_the_data(shipped, teleport):
    x, _ = _sample(shipped[1], 4, teleport=teleport)
    assert x.shape == (40, 1, 28, 28) and x.dtype == torch.float32 and torch.isfinite(x).all()
    # a Gaussian's tails reach past the pixel range (the background sits at -1), its bulk not
    assert (x.abs() <= 1.5).float().mean() > 0.95 and x.abs().max() < 5
    test_x, _ = load_fashion_mnist("test")
    assert abs(x.mean() - test_x.mean()) < 0.1


def test_samples_of_each_class_resemble_that_class_of_the_test_set(shipped):
    x, labels = _sample(shipped[1], 32)
    test_x, test_y = load_fashion_mnist("test")
    class_means = torch.stack([test_x[test_y == c].mean(0) for c in range(10)]).flatten(1)
    sample_means = torch.stack([x[labels == c].mean(0) for c in range(10)]).flatten(1)
    nearest = torch.cdist(sample_means, class_means).argmin(1)
    assert nearest.tolist() == list(range(10))
