"""Every recipe trains a few steps on a few hundred images and writes a loadable package."""

import pytest
import torch
from safetensors.torch import load_file

from engines import quality
from engines.noise import RowNoise, row_seeds
from engines.repository import Repository
from engines.samplers import create, drive
from service.cli import main

TINY_NET = ["--channels", "8,16", "--emb-dim", "32", "--log-every", "1"]
FEW = ["--limit", "256", "--batch", "16", "--steps", "2"]


def train(recipe: str, out, work, *extra: str) -> None:
    args = ["train", recipe, "--out", str(out), "--work", str(work), *FEW, *extra]
    assert main(args) == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run of every recipe, chained as a real run is: teacher -> students."""
    root = tmp_path_factory.mktemp("recipes")
    repo, work = root / "repo", root / "work"
    train("classifier", repo / "_classifiers" / "cnn", work / "classifier", "--log-every", "1")
    train("edm-teacher", repo / "fashion-edm", work / "edm", *TINY_NET)
    train("cd", repo / "fashion-cd", work / "cd", "--teacher", str(repo / "fashion-edm"))
    train("autoencoder", root / "ae", work / "ae", "--log-every", "1")
    ae = ["--autoencoder", str(root / "ae")]
    train("lcm-teacher", repo / "fashion-latent", work / "lt", *TINY_NET, *ae)
    train("lcm", repo / "fashion-lcm", work / "lcm", "--teacher", str(repo / "fashion-latent"))
    return repo, work


def sample(model, steps: int, rows: int = 3) -> torch.Tensor:
    noise = RowNoise(row_seeds(0, rows))
    sigmas = model.spec.grid(steps)
    x = noise.randn((rows, *model.spec.shape)) * float(sigmas[0])
    gen = create(model.spec.sampling.default_sampler, x, sigmas, noise)
    cond = {"label": torch.arange(rows), "guidance_scale": torch.full((rows,), 2.0)}
    with torch.inference_mode():
        return model.decode(drive(gen, model.denoiser, cond))


@pytest.mark.parametrize(
    ("name", "kind", "shape"),
    [
        ("fashion-edm", "edm", (1, 28, 28)),
        ("fashion-cd", "cm", (1, 28, 28)),
        ("fashion-latent", "edm", (4, 7, 7)),
        ("fashion-lcm", "lcm", (4, 7, 7)),
    ],
)
def test_each_recipe_writes_a_package_that_loads_and_samples(trained, name, kind, shape):
    repo = Repository(trained[0])
    model = repo.load(name)
    assert (model.spec.kind, model.spec.shape) == (kind, shape)
    out = sample(model, 2)
    assert out.shape == (3, 1, 28, 28) and torch.isfinite(out).all()
    card = (trained[0] / name / "1" / "MODEL_CARD.md").read_text()
    assert "fewstep train" in card and "256 training images" in card


def test_teacher_package_carries_teleport_statistics(trained):
    model = Repository(trained[0]).load("fashion-edm")
    assert model.gaussian is not None and model.gaussian.classes == 10
    assert model.spec.sampling.teleport_sigma == 10.0


def test_the_classifier_package_loads_for_the_harness(trained):
    clf = quality.load_classifier(trained[0] / "_classifiers" / "cnn")
    feats, preds = quality.embed(clf, torch.zeros(2, 1, 28, 28))
    assert feats.shape == (2, clf.config.features) and preds.shape == (2,)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    common = ["--log-every", "1", "--checkpoint-every", "1", "--limit", "64", "--batch", "8"]
    args = ["train", "edm-teacher", *TINY_NET[:4], *common]
    out_a, out_b = tmp_path / "a" / "m", tmp_path / "b" / "m"
    assert main([*args, "--steps", "3", "--out", str(out_a), "--work", str(tmp_path / "wa")]) == 0
    work_b = ["--out", str(out_b), "--work", str(tmp_path / "wb")]
    assert main([*args, "--steps", "1", *work_b]) == 0
    assert main([*args, "--steps", "3", "--resume", *work_b]) == 0
    a = load_file(str(out_a / "1" / "weights.safetensors"))
    b = load_file(str(out_b / "1" / "weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_a_student_continues_from_its_own_package_and_refuses_a_foreign_one(trained, capsys):
    repo, work = trained
    first = Repository(repo).load("fashion-cd")
    train(
        "cd",
        repo / "fashion-cd",
        work / "cd2",
        "--teacher",
        str(repo / "fashion-edm"),
        "--init",
        str(repo / "fashion-cd"),
        "--version",
        "2",
        "--store-dtype",
        "float16",
    )
    again = Repository(repo).load("fashion-cd", 2)
    card = (repo / "fashion-cd" / "2" / "MODEL_CARD.md").read_text()
    assert f"Continued from the student `{repo / 'fashion-cd'}` v1" in card
    assert first.fingerprint in card and "float16 safetensors" in card
    weights = load_file(str(repo / "fashion-cd" / "2" / "weights.safetensors"))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float16}
    assert torch.isfinite(sample(again, 2)).all()
    args = ["train", "cd", "--out", str(work / "x"), "--work", str(work / "x"), *FEW]
    args += ["--teacher", str(repo / "fashion-edm")]
    assert main([*args, "--init", str(repo / "fashion-edm")]) == 2
    err = capsys.readouterr().err
    assert f"fewstep train cd: --init {repo / 'fashion-edm'} is a 'edm' package, not 'cm'" in err
    assert main([*args, "--init", str(work / "nowhere")]) == 2
    assert "a model folder needs a model.yaml" in capsys.readouterr().err


def test_max_minutes_stops_early_and_the_card_records_the_steps_reached(tmp_path, capsys):
    out = tmp_path / "m"
    args = ["train", "edm-teacher", *TINY_NET, "--limit", "64", "--batch", "8"]
    args += ["--steps", "500", "--max-minutes", "0.0001", "--out", str(out)]
    assert main([*args, "--work", str(tmp_path / "w")]) == 0
    assert "--max-minutes 0.0001 reached: stopping at step 1" in capsys.readouterr().out
    card = (out / "1" / "MODEL_CARD.md").read_text()
    assert "1 steps at batch 8" in card and "--max-minutes 0.0001" in card


def test_eval_reports_fd_accuracy_and_the_floor(trained, capsys, monkeypatch):
    repo = trained[0]
    args = ["eval", "fashion-cd", "--steps", "1", "--n", "40", "--model-repo", str(repo)]
    assert main([*args, "--classifier", str(repo / "_classifiers" / "cnn")]) == 0
    out = capsys.readouterr().out
    assert "fashion-cd cm_multistep steps=1 nfe=1" in out and "FD" in out and "floor" in out


@pytest.mark.parametrize("command", ["eval", "eval-speech"])
def test_an_evaluation_out_path_is_checked_before_any_work(command, tmp_path, capsys):
    """--out's folder is made up front; a path that cannot be written is one line, exit 2,
    before minutes of evaluation (not a traceback after them)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    head = ["eval", "fashion-edm"] if command == "eval" else ["eval-speech", "--no-wer"]
    assert main([*head, "--out", str(blocker / "table.md")]) == 2
    assert "its folder" in capsys.readouterr().err
    assert main([*head, "--out", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
