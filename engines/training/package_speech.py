"""Writes a trained speech model as a model_repo package: model.yaml, weights, model card."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

from torch import nn

from engines.nets import config_to_dict
from engines.nets.tts import TTSConfig
from engines.speech.frontend import VOICE
from engines.training import common, package

VOCODER = "slt-vocos"  # `fewstep train vocoder`'s package under model_repo/_vocoders/
ODE = ["heun", "euler", "dpmpp_2m", "ddpm", "dpmpp_sde", "euler_ancestral"]
KINDS = {
    # role: (description, samplers, default sampler, default steps, max steps, parameterisation)
    "teacher": (
        "English text-to-speech (Festival slt voice as teacher), 22.05 kHz: a Grad-TTS-style "
        "EDM teacher (phone encoder, duration predictor, 1-D mel denoiser) + a vocoder.",
        ODE,
        "ddpm",  # 2 x0 steps: the teacher's best WER (README "Speech"); Heun 10 its worst
        2,
        50,
        "edm",
    ),
    "prodiff": (
        "English text-to-speech, 22.05 kHz: a ProDiff-style 2-step student (x0 prediction, "
        "progressive distillation of the teacher), sampled with the DDPM posterior.",
        ["ddpm"],
        "ddpm",
        2,
        2,
        "edm",
    ),
    "comospeech": (
        "English text-to-speech, 22.05 kHz: a CoMoSpeech-style consistency student distilled "
        "from the teacher, 1 step (more on request).",
        ["cm_multistep"],
        "cm_multistep",
        1,
        4,
        "consistency",
    ),
}
VOICE_NOTE = (
    f"Teacher voice: Festival's HTS voice `{VOICE}` (Debian `festvox-us-slt-hts`; "
    "Copyright 2003 Carnegie Mellon University, EST-2003 licence: free use, modification "
    "and distribution with the copyright notice kept; HTS parts (c) Nagoya Institute of "
    "Technology, BSD-3-Clause). The model's voice `slt` imitates that synthetic voice."
)


@dataclasses.dataclass
class SpeechPackage:
    role: str  # teacher, prodiff or comospeech
    run: common.RunConfig
    network: TTSConfig
    weights: nn.Module
    settings: tuple[object, ...]
    seconds: float
    data: object  # engines.training.speech.Data
    steps_done: int
    notes: str = ""
    sigmas: tuple[float, ...] = (20.0, 1.0)


def model_yaml(p: SpeechPackage) -> dict:
    description, samplers, default, steps, max_steps, param = KINDS[p.role]
    return {
        "kind": "speech",
        "description": description,
        "shape": [p.network.n_mels],
        "data_range": [-1, 1],
        "labels": [],
        "sampling": {
            "samplers": samplers,
            "default_sampler": default,
            "default_steps": steps,
            "max_steps": max_steps,
            "sigma_min": 0.002,
            "sigma_max": 20.0,
            "rho": 7.0,
            "teleport_sigma": None,
            "default_guidance": 1.0,
            "max_guidance": 1.0,
        },
        "max_batch_size": 32,
        "max_n": 16,
        "speech": {
            "network": config_to_dict(p.network),
            "parameterisation": param,
            "sigmas": list(p.sigmas) if param == "edm" else [],
            "sample_rate": 22050,
            "hop": 256,
            "voices": ["slt"],
            "max_chars": 2000,
            "max_sentences": 16,
            "vocoder": vocoder_for(Path(p.run.out)),
        },
    }


def vocoder_for(out: Path) -> str:
    """The shared neural vocoder when the package's repository holds it, else Griffin-Lim."""
    shared = out.parent / "_vocoders" / VOCODER / "vocoder.yaml"
    return VOCODER if shared.is_file() else "griffin-lim"


def write(p: SpeechPackage, log: common.Log = print) -> Path:
    out = Path(p.run.out)
    folder = out / str(p.run.version)
    folder.mkdir(parents=True, exist_ok=True)
    size = common.save_weights(p.weights, folder / "weights.safetensors", p.run.store_dtype)
    sizes = {"weights.safetensors": size}
    fingerprint = package.publish(out, p.run.version, "speech", model_yaml(p), sizes, log)
    (folder / "MODEL_CARD.md").write_text(card(p, fingerprint, size))
    return folder


def card(p: SpeechPackage, fingerprint: str, size: int) -> str:
    params = common.count_params(p.weights)
    epochs = p.steps_done * p.run.batch / max(len(p.data.utts), 1)
    return f"""# {Path(p.run.out).name} v{p.run.version}

{KINDS[p.role][0]}

{p.notes}

## Recipe

    {common.command_line(p.run)}

## Data

{len(p.data.utts)} utterances ({p.data.hours():.2f} h) synthesised offline on this machine by
`fewstep train speech-data` from WordNet example sentences (Debian `wordnet-base`); the
corpus' {len(p.data.test)} held-out test sentences are never trained on. 80-bin log-mel,
22.05 kHz, hop 256, standardised per bin (statistics in the weights). {p.steps_done} steps at
batch {p.run.batch} = {epochs:.1f} epochs.

{VOICE_NOTE}

## Settings

{common.settings_table(p.run, *p.settings)}

Network: `{config_to_dict(p.network)}`, {params / 1e6:.2f}M parameters.

## Files

- `weights.safetensors` ({size / 1e6:.2f} MB, {p.run.store_dtype}; loading casts to
  float32), fingerprint `{fingerprint}`.

## Training

{common.hardware(p.run)}, device `{p.run.device}`; {p.seconds / 60:.1f} min training wall
time (all parts of a resumed run); {datetime.date.today().isoformat()}.

## Quality

Measured by `fewstep eval-speech` on the held-out sentences; see README ("Speech").
"""
