"""A tiny randomly initialised speech model (real front end, encoder, sampler, vocoder)."""

from __future__ import annotations

import torch

from engines.nets.tts import TTS, TTSConfig
from engines.repository import LoadedModel, ModelSpec, SamplingSpec
from engines.speech.model import Speech
from engines.speech.spec import SpeechSpec

TINY = TTSConfig(
    width=32, enc_convs=1, enc_layers=1, heads=2, ffn=64, dec_width=32, dec_blocks=2, emb_dim=16
)
SAMPLERS = {"edm": ("ddpm", "heun", "euler"), "consistency": ("cm_multistep",)}


def tiny_speech_spec(name: str = "speech-tiny", parameterisation: str = "edm") -> ModelSpec:
    samplers = SAMPLERS[parameterisation]
    return ModelSpec(
        name=name,
        version=1,
        kind="speech",
        description="tiny random speech model for tests",
        shape=(80,),
        labels=(),
        synonyms={},
        data_range=(-1.0, 1.0),
        sampling=SamplingSpec(
            samplers,
            samplers[0],
            2 if samplers[0] == "ddpm" else 1,
            8,
            0.002,
            20.0,
            7.0,
            None,
            1.0,
            1.0,
        ),
        max_batch_size=32,
        max_n=16,
        speech=SpeechSpec(
            TINY,
            parameterisation,
            (20.0, 1.0) if parameterisation == "edm" else (),
            22050,
            256,
            ("slt",),
            400,
            4,
        ),
    )


def tiny_speech_model(name: str = "speech-tiny", parameterisation: str = "edm") -> LoadedModel:
    torch.manual_seed(0)
    tts = TTS(TINY).eval().requires_grad_(False)
    with torch.no_grad():  # durations of about 5 frames per phone, so audio is not empty
        tts.encoder.dur[-1].bias.fill_(1.8)
        tts.denoiser.out.weight.normal_(0, 0.02)
    spec = tiny_speech_spec(name, parameterisation)
    speech = Speech(spec, tts)
    return LoadedModel(spec, speech.denoiser, None, "sha256:tiny", modules=(tts,), speech=speech)
