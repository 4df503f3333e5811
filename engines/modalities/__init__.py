"""Modalities: what differs between images and speech, one module each (see base.py).

`modality_of(spec)` finds a model's modality from its kind's entry in the repository's
kind registry (engines.repository.kinds); nothing above this package branches on the kind.
"""

from __future__ import annotations

from engines.repository.kinds import KINDS

from .base import (
    Cost,
    Info,
    InputError,
    Inputs,
    Modality,
    OutputTensor,
    Payload,
    Signature,
    Started,
    TensorSpec,
    Unavailable,
)
from .image import ImageInfo, ImageInputs, ImageModality
from .speech import AudioInfo, SpeechInputs, SpeechModality

MODALITIES: dict[str, Modality] = {m.name: m for m in (ImageModality(), SpeechModality())}


def modality_of(spec) -> Modality:
    """The modality of a model (an engines.repository.ModelSpec)."""
    return MODALITIES[KINDS[spec.kind].modality]


def modality_named(name: str) -> Modality:
    return MODALITIES[name]


def inputs_from_dict(data: dict) -> Inputs:
    """A Job's inputs back from Inputs.to_dict()."""
    data = dict(data)
    return MODALITIES[data.pop("kind")].inputs_type(**data)


def info_from_dict(data: dict) -> Info:
    """A JobResult's info back from Info.to_dict()."""
    data = dict(data)
    return MODALITIES[data.pop("kind")].info_type(**data)


__all__ = [
    "MODALITIES",
    "AudioInfo",
    "Cost",
    "ImageInfo",
    "ImageInputs",
    "ImageModality",
    "Info",
    "InputError",
    "Inputs",
    "Modality",
    "OutputTensor",
    "Payload",
    "Signature",
    "SpeechInputs",
    "SpeechModality",
    "Started",
    "TensorSpec",
    "Unavailable",
    "info_from_dict",
    "inputs_from_dict",
    "modality_named",
    "modality_of",
]
