"""`fewstep train speech-data | speech-teacher | prodiff | comospeech | vocoder`: the speech
recipes' arguments and dispatch (registered by engines.training.recipes)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from engines.nets.tts import TTSConfig
from engines.nets.vocoder import VocoderConfig
from engines.training import common
from engines.training.package_speech import VOCODER
from engines.training.registry import Recipe, run_config

CORPUS = "runs/speech-data/corpus.pt"
TEACHER = "model_repo/speech-teacher"
DEFAULTS = {
    "speech-teacher": {"out": TEACHER, "steps": 100_000, "lr": 5e-4, "minutes": 25.0},
    "prodiff": {"out": "model_repo/speech-prodiff", "steps": 100_000, "lr": 2e-4, "minutes": 10.0},
    "comospeech": {
        "out": "model_repo/speech-comospeech",
        "steps": 100_000,
        "lr": 2e-4,
        "minutes": 10.0,
    },
    "vocoder": {
        "out": f"model_repo/_vocoders/{VOCODER}",
        "steps": 100_000,
        "lr": 5e-4,
        "minutes": 45.0,
    },
}
HELP = {
    "speech-teacher": "Grad-TTS-style EDM teacher on the speech corpus",
    "prodiff": "ProDiff 2-step student (progressive distillation of the speech teacher)",
    "comospeech": "CoMoSpeech 1-step student (consistency distillation of the speech teacher)",
    "vocoder": "Vocos-style neural vocoder (log-mel -> STFT magnitude and phase) for speech",
}


def _data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=str(Path(CORPUS).parent), help="corpus folder")
    p.add_argument("--utterances", type=int, default=2000, help="test ones included (2000)")
    p.add_argument("--test", type=int, default=40, help="held-out test sentences (40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="festival processes (2)")


def _arguments(name: str) -> Callable[[argparse.ArgumentParser], None]:
    d = DEFAULTS[name]

    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", default=d["out"], help=f"package folder (default {d['out']})")
        p.add_argument("--version", type=int, default=1)
        p.add_argument("--work", default=None, help="checkpoint folder (default runs/<recipe>)")
        p.add_argument(
            "--max-minutes",
            type=float,
            default=d["minutes"],
            help=f"training wall-clock budget (default {d['minutes']}; 0: run --steps)",
        )
        p.add_argument(
            "--store-dtype",
            default="float16",
            choices=["float32", "float16", "bfloat16"],
            help="dtype of the package's weights (default float16; loading casts to float32)",
        )
        p.add_argument("--steps", type=int, default=d["steps"], help="step limit")
        p.add_argument("--batch", type=int, default=16)
        p.add_argument("--lr", type=float, default=d["lr"])
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu")
        p.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
        p.add_argument("--limit", type=int, default=0, help="first N utterances (0: all)")
        p.add_argument("--checkpoint-every", type=int, default=200)
        p.add_argument("--log-every", type=int, default=50)
        p.add_argument("--resume", action="store_true")
        p.add_argument("--data", default=CORPUS, help=f"corpus.pt ({CORPUS})")
        p.add_argument(
            "--threads",
            type=int,
            default=0,
            help="torch CPU threads (0: torch's default; 1 is fastest on a busy machine)",
        )
        if name == "speech-teacher":
            p.add_argument("--width", type=int, default=192)
            p.add_argument("--dec-width", type=int, default=192)
            p.add_argument("--dec-blocks", type=int, default=8)
            p.add_argument("--sigma-mix", type=float, default=0.5)
            p.add_argument(
                "--init",
                default=None,
                help="continue from this teacher package's weights (same network flags; "
                "fresh optimiser)",
            )
        elif name == "vocoder":
            p.add_argument("--name", default=VOCODER, help=f"vocoder name ({VOCODER})")
            p.add_argument("--width", type=int, default=VocoderConfig.width)
            p.add_argument("--blocks", type=int, default=VocoderConfig.blocks)
            p.add_argument("--segment", type=int, default=64, help="frames per segment (64)")
            p.add_argument("--mel-weight", type=float, default=1.0)
        else:
            p.add_argument("--teacher", default=TEACHER, help=f"teacher package ({TEACHER})")
        if name == "comospeech":
            p.add_argument(
                "--loss",
                default="l2",
                choices=["l2", "pseudo-huber"],
                help="consistency distance: squared error (default) or improved consistency "
                "training's pseudo-Huber",
            )
            p.add_argument(
                "--solver",
                default="euler",  # speech.CMSettings (not imported here: it needs torch)
                choices=["euler", "heun"],
                help="the teacher's ODE step between grid points (default euler, i.e. DDIM, as "
                "latent consistency models distil; heun is the consistency-models paper's)",
            )
            p.add_argument(
                "--grid",
                type=int,
                default=4,
                help="Karras grid points from sigma_min to sigma_max (default 4: the student "
                "learns the teacher's 4-step path; the paper's 18 learns the exact ODE end)",
            )

    return add_arguments


def data_main(args: argparse.Namespace) -> int:
    from engines.speech import corpus

    corpus.build(Path(args.out), args.utterances, args.test, args.seed, args.workers)
    return 0


def main(args: argparse.Namespace) -> int:
    """Run a recipe; input problems are one line and exit status 2."""
    return common.one_line_errors(args.recipe, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import torch

    from engines.training import speech

    if args.threads:
        torch.set_num_threads(args.threads)
    run = run_config(args)
    if args.recipe == "speech-teacher":
        net = TTSConfig(width=args.width, dec_width=args.dec_width, dec_blocks=args.dec_blocks)
        settings = speech.TeacherSettings(sigma_mix=args.sigma_mix, init=args.init)
        speech.run_teacher(run, net, settings)
    elif args.recipe == "vocoder":
        from engines.training import vocoder

        net = VocoderConfig(width=args.width, blocks=args.blocks)
        settings = vocoder.VocoderSettings(segment=args.segment, mel_weight=args.mel_weight)
        vocoder.run(run, args.name, net, settings)
    elif args.recipe == "prodiff":
        speech.run_prodiff(run, args.teacher, speech.ProDiffSettings())
    else:
        speech.run_comospeech(
            run, args.teacher, speech.CMSettings(grid=args.grid, loss=args.loss, solver=args.solver)
        )
    return 0


RECIPES = (
    Recipe(
        "speech-data",
        "offline speech corpus: WordNet sentences, Festival slt, log-mels",
        _data_arguments,
        data_main,
    ),
    *(Recipe(name, HELP[name], _arguments(name), main) for name in DEFAULTS),
)
