"""The `speech:` section of a speech model's model.yaml."""

from __future__ import annotations

import dataclasses
import re

from torch import Tensor

from engines.nets.config import ConfigError, config_from_dict
from engines.nets.tts import TTSConfig
from engines.schedules import consistency_grid, karras_sigmas

PARAMETERISATIONS = ("edm", "consistency")
GRIFFIN_LIM = "griffin-lim"
VOCODER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
# OpenAI's standard voices, so unmodified clients work; each maps onto the model's voice.
OPENAI_VOICES = tuple(
    [
        "alloy",
        "ash",
        "ballad",
        "cedar",
        "coral",
        "echo",
        "fable",
        "marin",
        "nova",
        "onyx",
        "sage",
        "shimmer",
        "verse",
    ]
)


@dataclasses.dataclass(frozen=True)
class SpeechSpec:
    """What a speech model adds to ModelSpec: its network, sampler grid, voices, limits."""

    network: TTSConfig
    parameterisation: str  # "edm" (teacher, ProDiff x0 student) or "consistency"
    sigmas: tuple[float, ...]  # levels an x0 student was trained at ([] if none)
    sample_rate: int
    hop: int
    voices: tuple[str, ...]  # the model's own voices; the first is the default
    max_chars: int  # input text limit per request
    max_sentences: int  # sentences synthesised as one batch
    # The cost bound, in seconds of audio after the front end and durations (speed
    # included): one sentence, and the request's rows x its longest sentence (the padded
    # batch the sampler runs), so that neither one long sentence nor many short rows padded
    # to a long one run for minutes. Optional in model.yaml.
    max_seconds_per_sentence: float = 40.0
    max_seconds_per_request: float = 320.0
    # The vocoder: a neural vocoder's name (model_repo/_vocoders/<name>/, shared by the
    # speech models that name it) or "griffin-lim", which needs no weights. Optional.
    vocoder: str = GRIFFIN_LIM

    @property
    def max_frames_per_sentence(self) -> int:
        return int(self.max_seconds_per_sentence * self.sample_rate / self.hop)

    @property
    def max_frames_per_request(self) -> int:
        return int(self.max_seconds_per_request * self.sample_rate / self.hop)

    def voice(self, name: str) -> str | None:
        """The model voice a requested name maps to (OpenAI names map to the first)."""
        key = name.strip().lower()
        if key in self.voices:
            return key
        return self.voices[0] if key in OPENAI_VOICES else None

    def grid(self, steps: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
        """The trained levels when steps matches them, consistency picks, else Karras."""
        if self.sigmas and steps == len(self.sigmas):
            return karras_sigmas(1, sigma_min, sigma_max, rho).new_tensor([*self.sigmas, 0.0])
        if self.parameterisation == "consistency":
            return consistency_grid(steps, sigma_min, sigma_max, rho)
        return karras_sigmas(steps, sigma_min, sigma_max, rho)


OPTIONAL = {
    f.name: f.default
    for f in dataclasses.fields(SpeechSpec)
    if f.name in ("max_seconds_per_sentence", "max_seconds_per_request")
}
OPTIONAL_KEYS = (*OPTIONAL, "vocoder")


def parse_speech(data: object) -> SpeechSpec:
    """SpeechSpec from a mapping; ValueError names the key that is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"must be a mapping, got {data!r}")
    names = [f.name for f in dataclasses.fields(SpeechSpec)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; the keys are {names}")
    missing = sorted(set(names) - set(data) - set(OPTIONAL_KEYS))
    if missing:
        raise ValueError(f"missing key(s) {missing}")
    try:
        network = config_from_dict(TTSConfig, data["network"])
    except ConfigError as err:
        raise ValueError(f"network: {err}") from None
    if data["parameterisation"] not in PARAMETERISATIONS:
        raise ValueError(f"parameterisation must be one of {PARAMETERISATIONS}")
    sigmas = data["sigmas"]
    if (
        not isinstance(sigmas, list)
        or not all(isinstance(v, (int, float)) and v > 0 for v in sigmas)
        or sorted(sigmas, reverse=True) != sigmas
    ):
        raise ValueError(f"sigmas must be a decreasing list of positive numbers, got {sigmas!r}")
    voices = data["voices"]
    if (
        not isinstance(voices, list)
        or not voices
        or not all(isinstance(v, str) and v == v.strip().lower() and v for v in voices)
    ):
        raise ValueError(f"voices must be a non-empty list of lower-case names, got {voices!r}")
    for key in ("sample_rate", "hop", "max_chars", "max_sentences"):
        value = data[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    limits = {}
    for key, default in OPTIONAL.items():
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{key} must be a positive number of seconds, got {value!r}")
        limits[key] = float(value)
    if limits["max_seconds_per_sentence"] > limits["max_seconds_per_request"]:
        raise ValueError("max_seconds_per_sentence must not exceed max_seconds_per_request")
    vocoder = data.get("vocoder", GRIFFIN_LIM)
    if not isinstance(vocoder, str) or not VOCODER_NAME.fullmatch(vocoder):
        raise ValueError(
            f"vocoder must be {GRIFFIN_LIM!r} or the name of a folder under "
            f"model_repo/_vocoders/ (lower-case letters, digits, '.', '_', '-'), got {vocoder!r}"
        )
    return SpeechSpec(
        network,
        data["parameterisation"],
        tuple(float(v) for v in sigmas),
        data["sample_rate"],
        data["hop"],
        tuple(voices),
        data["max_chars"],
        data["max_sentences"],
        **limits,
        vocoder=vocoder,
    )
