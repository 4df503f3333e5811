"""Speech: text -> phones -> mels (the sampler) -> vocoder -> one encoded utterance.

A request's sentences are its rows. Before admission `check` runs the front end and the
duration predictor (`Speech.plan`) and refuses what would be too long; when the request
starts the checked plan (cached, no second trip to Festival) is encoded; the sampler then
runs on each sentence's standardised mels, and rows of different lengths share a forward
pass, zero-padded with the mask hiding the padding. When the sampler is done the
sentences are vocoded (each at its own length, giving up once the job is canceled or
late), joined and encoded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from engines.noise import row_seeds
from engines.samplers import cat_cond, split_rows

from .base import (
    Collated,
    Info,
    InputError,
    Inputs,
    Modality,
    OutputTensor,
    Signature,
    Started,
    StopCheck,
    TensorSpec,
    Unavailable,
    never,
    scalar,
    text_of,
)

# Speech models render their own audio (Speech.render): format -> media type. "f32" is
# raw little-endian float32 samples, the Open Inference Protocol's audio tensor.
AUDIO_TYPES = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "pcm": "audio/pcm",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "f32": "application/octet-stream",
}


@dataclass
class SpeechInputs(Inputs):
    kind: ClassVar[str] = "speech"

    sentences: list[str]  # one row each
    speed: float = 1.0  # durations are divided by it


@dataclass
class AudioInfo(Info):
    kind: ClassVar[str] = "speech"

    sample_rate: int = 0
    seconds: float = 0.0

    @property
    def duration(self) -> float:
        return self.seconds


def available_formats() -> list[str]:
    from engines.speech.audio import available_formats as have

    return have()


def sentences_of(text: str, spec) -> list[str]:
    """The input's sentences; InputError for empty or too long input."""
    from engines.speech.model import split_sentences

    s = spec.speech
    if not text.strip():
        raise InputError("input is empty; send the text to speak", param="input")
    if len(text) > s.max_chars:
        raise InputError(
            f"input is {len(text)} characters; model {spec.name} takes at most {s.max_chars} "
            "per request: split the text over several requests",
            param="input",
        )
    sentences = split_sentences(text)
    if len(sentences) > s.max_sentences:
        raise InputError(
            f"input has {len(sentences)} sentences; model {spec.name} takes at most "
            f"{s.max_sentences} per request: split the text over several requests",
            param="input",
        )
    return sentences


@contextlib.contextmanager
def _front_end_errors():
    """The front end's failures as the modality's: a hung or dead (or missing) Festival is
    Unavailable (503), a text it cannot speak or a plan over the limits an InputError."""
    from engines.speech.frontend import FrontendError

    try:
        yield
    except FrontendError as exc:
        raise Unavailable(str(exc)) from None
    except ValueError as exc:  # TooLong, nothing to say
        raise InputError(str(exc), param="input") from None
    except (KeyError, RuntimeError) as exc:
        raise InputError(f"the text front end could not read the input: {exc}", "input") from None


class SpeechModality(Modality):
    name = "speech"
    noun = "speech"
    endpoint = "POST /v1/audio/speech"
    inputs_type = SpeechInputs
    info_type = AudioInfo
    may_block = True  # Festival

    def parse(self, spec, fields: Mapping[str, Any]) -> tuple[SpeechInputs, int]:
        """Fields: input (the text), voice, speed, instructions."""
        voice = fields.get("voice", spec.speech.voices[0])
        if spec.speech.voice(voice) is None:
            from engines.speech.spec import OPENAI_VOICES

            raise InputError(
                f"unknown voice {voice!r}; model {spec.name} speaks as "
                f"{list(spec.speech.voices)} (OpenAI's voices {OPENAI_VOICES} map onto "
                f"{spec.speech.voices[0]!r})",
                param="voice",
            )
        if fields.get("instructions"):
            raise InputError(
                "instructions (voice styling) are not supported by fewstep's models; omit them",
                param="instructions",
            )
        sentences = sentences_of(fields.get("input", ""), spec)
        speed = fields.get("speed")
        return SpeechInputs(sentences, 1.0 if speed is None else speed), len(sentences)

    def output_format(self, requested: str | None, tensor: bool = False) -> str:
        if tensor:
            return "f32"
        have = available_formats()
        if requested is None:  # OpenAI's default is mp3
            return "mp3" if "mp3" in have else "wav"
        if requested not in have:
            raise InputError(
                f"response_format {requested!r} needs an encoder this server does not have; "
                f"use one of {have}",
                param="response_format",
            )
        return requested

    def media_type(self, output_format: str) -> str:
        return AUDIO_TYPES[output_format]

    def describe(self, spec) -> dict:
        return {
            "size": None,
            "voices": list(spec.speech.voices),
            "sample_rate": spec.speech.sample_rate,
            "response_formats": available_formats(),
            "max_input_chars": spec.speech.max_chars,
            "max_sentences": spec.speech.max_sentences,
        }

    def check(self, spec, inputs: SpeechInputs, model) -> None:
        """Frames after the front end and the duration predictor, per sentence and per
        request, against the model's limits (`Speech.plan`). Without weights (an API-only
        process) the front end alone bounds the cost: every phone takes at least a frame
        (skipped where Festival is not installed beside the API); the worker checks the
        frames at start, before it samples."""
        from engines.speech.frontend import FrontendError, FrontendUnavailable
        from engines.speech.model import plan_phones

        with _front_end_errors():
            if model is not None:
                model.speech.plan(inputs.sentences, inputs.speed)
                return
            try:
                plan_phones(spec, inputs.sentences, inputs.speed)
            except FrontendUnavailable:
                raise
            except FrontendError:
                return  # no Festival beside this API: the worker checks at start

    def start(self, job, model, dtype: torch.dtype, device: str) -> Started:
        """The checked plan (front end and durations, cached from admission) -> prior mu,
        then the sampler over the request's padded mels."""
        inputs: SpeechInputs = job.inputs
        with _front_end_errors():
            plan = model.speech.plan(inputs.sentences, inputs.speed)
        prepared = model.speech.prepare_plan(plan, device)
        gen, cond, total = model.speech.start(
            prepared, job.sampler, job.steps, row_seeds(job.seed, job.n), dtype, device
        )
        return Started(gen, cond, total, state=prepared.frames)

    def batch_key(self, x: Tensor) -> tuple:
        """Any lengths share a pass (padded, masked): the frame axis is left out."""
        return tuple(x.shape[1:-1])

    def collate(self, xs: list[Tensor], conds: list) -> Collated:
        """Zero-pad each request's x and per-frame cond tensors (mu, mask) to the longest."""
        lengths = [x.shape[-1] for x in xs]
        sizes = [len(x) for x in xs]
        frames = max(lengths)

        def pad(t: Tensor) -> Tensor:
            return torch.nn.functional.pad(t, (0, frames - t.shape[-1]))

        if len(set(lengths)) > 1:
            conds = [{k: pad(v) if v.ndim == 3 else v for k, v in c.items()} for c in conds]
            xs = [pad(x) for x in xs]

        def split(out: Tensor) -> list[Tensor]:
            parts = split_rows(out, sizes)
            return [p[..., :n] for p, n in zip(parts, lengths, strict=True)]

        return torch.cat(xs), cat_cond(conds), split

    def finish(
        self, model, job, sample: Tensor, state: Any, should_stop: StopCheck = never
    ) -> tuple[list[bytes], AudioInfo]:
        audio, seconds = model.speech.render(sample, state, job.output_format, should_stop)
        return [audio], AudioInfo(model.speech.mel.sample_rate, seconds)

    def finish_many(
        self, model, jobs: list, samples: list[Tensor], states: list, stops: list[StopCheck]
    ) -> list[tuple[list[bytes], AudioInfo] | Exception]:
        """With a batched (neural) vocoder, every sentence of every job in one vocoder pass
        (Speech.render_many); Griffin-Lim, or a single job, goes job by job."""
        if len(jobs) < 2 or not getattr(model.speech.vocoder, "batched", False):
            return super().finish_many(model, jobs, samples, states, stops)
        rendered = model.speech.render_many(
            samples, states, [job.output_format for job in jobs], stops
        )
        rate = model.speech.mel.sample_rate
        return [
            r if isinstance(r, Exception) else ([r[0]], AudioInfo(rate, r[1])) for r in rendered
        ]

    # -- Open Inference Protocol -------------------------------------------------------

    def signature(self, spec) -> Signature:
        """text BYTES [1] (plus seed, steps, sampler, speed); returns the whole utterance
        as audio FP32 [samples] in [-1, 1] and its sample_rate INT32 [1]."""
        inputs = [
            TensorSpec("text", "BYTES", (1,), required=True),
            TensorSpec("seed", "INT64", (1,)),
            TensorSpec("steps", "INT32", (1,)),
            TensorSpec("sampler", "BYTES", (1,)),
            TensorSpec("speed", "FP32", (1,)),
        ]
        outputs = [TensorSpec("audio", "FP32", (-1,)), TensorSpec("sample_rate", "INT32", (1,))]
        return Signature.of(inputs, outputs)

    def from_tensors(self, spec, tensors: Mapping[str, list]) -> dict[str, Any]:
        if "text" not in tensors:
            raise InputError("input 'text' (BYTES, shape [1]) is missing; send the text")
        speed = scalar(tensors, "speed")
        return {
            "input": text_of("text", scalar(tensors, "text")),
            "speed": 1.0 if speed is None else speed,
        }

    def to_tensors(self, spec, outputs: list[bytes], seeds: list[int], info: Info) -> dict:
        audio = outputs[0]
        rate = np.asarray([info.sample_rate], "<i4").tobytes()
        return {
            "audio": OutputTensor("audio", "FP32", [len(audio) // 4], audio),
            "sample_rate": OutputTensor("sample_rate", "INT32", [1], rate),
        }
