"""Images: class-conditional (or unconditional) samples encoded as PNG or raw pixels.

Inputs are one class id per image, a guidance scale and the teleport flag; a request's
rows double under classifier-free guidance. Latent models are decoded to pixels before a
preview or an output is encoded (`LoadedModel.decode`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from engines.media import ENCODINGS, encode_images
from engines.noise import row_seeds
from engines.repository import GRID_CHOICES, GridError
from engines.sampling import start_sampler

from .base import (
    Info,
    InputError,
    Inputs,
    Modality,
    OutputTensor,
    Signature,
    Started,
    StopCheck,
    TensorSpec,
    never,
    scalar,
    text_of,
)


@dataclass
class ImageInputs(Inputs):
    kind: ClassVar[str] = "image"

    labels: list[int]  # one class id per image; [] for an unconditional model
    guidance_scale: float = 1.0
    teleport: bool = False
    grid: str = "auto"  # "auto" (tuned where model.yaml has one), "tuned" or "karras"

    def rows(self, n: int) -> int:
        """Classifier-free guidance runs a conditional and an unconditional row."""
        return n * (2 if self.guidance_scale != 1.0 else 1)

    def static_key(self) -> tuple:
        return (self.guidance_scale, self.teleport, self.grid)

    def revised_prompt(self, spec) -> str | None:
        return spec.labels[self.labels[0]] if self.labels else None


@dataclass
class ImageInfo(Info):
    kind: ClassVar[str] = "image"

    width: int = 0
    height: int = 0
    grid: str = ""  # the grid the samples were drawn on: "tuned", "karras" or "teleport"


def _unknown_class(spec, text: str, where: str) -> InputError:
    return InputError(
        f"{where} {text!r} is not a class of model {spec.name}; use one of "
        f"{list(spec.labels)} (synonyms: {sorted(spec.synonyms)})",
        param="prompt",
    )


class ImageModality(Modality):
    name = "image"
    noun = "images"
    endpoint = "POST /v1/images/generations"
    inputs_type = ImageInputs
    info_type = ImageInfo

    def parse(self, spec, fields: Mapping[str, Any]) -> tuple[ImageInputs, int]:
        """Fields: prompt and n (or labels: class ids, one per image, already checked),
        size, guidance_scale, teleport, grid."""
        s = spec.sampling
        height, width = spec.image_shape[-2], spec.image_shape[-1]
        size = fields.get("size")
        if size is not None and size != f"{width}x{height}":
            raise InputError(
                f"model {spec.name} makes {width}x{height} images; send size '{width}x{height}'",
                param="size",
            )
        labels = fields.get("labels")
        n = len(labels) if labels else fields.get("n", 1)
        if n > spec.max_n:
            raise InputError(
                f"n must be at most {spec.max_n} for model {spec.name}; send several requests "
                "for more",
                param="n",
            )
        if labels is None:
            labels = []
            if spec.labels:
                label = spec.label_id(fields.get("prompt", ""))
                if label is None:
                    raise _unknown_class(spec, fields.get("prompt", ""), "prompt")
                labels = [label] * n
        guidance = fields.get("guidance_scale")
        guidance = s.default_guidance if guidance is None else guidance
        if guidance != 1.0 and not spec.labels:
            raise InputError(
                "guidance_scale needs a class-conditional model; omit it", param="guidance_scale"
            )
        if guidance > s.max_guidance or (s.max_guidance == 1.0 and guidance != 1.0):
            hint = " (it has no classifier-free guidance; omit it)" if s.max_guidance == 1 else ""
            raise InputError(
                f"guidance_scale must be at most {s.max_guidance} for model {spec.name}{hint}",
                param="guidance_scale",
            )
        teleport = bool(fields.get("teleport", False))
        if teleport and s.teleport_sigma is None:
            raise InputError(
                f"model {spec.name} ships no Gaussian statistics, so teleport is not available",
                param="teleport",
            )
        grid = fields.get("grid") or "auto"
        if grid not in GRID_CHOICES:
            raise InputError(
                f"grid must be one of {list(GRID_CHOICES)} ('auto': the tuned grid where model "
                f"{spec.name} has one), got {grid!r}",
                param="grid",
            )
        if teleport and grid == "tuned":
            raise InputError(
                "teleport keeps its own grid (a jump, then Karras); send grid 'auto' or omit "
                "teleport to use a tuned grid",
                param="grid",
            )
        return ImageInputs(labels, guidance, teleport, grid), n

    def check_sampling(self, spec, inputs: ImageInputs, sampler: str, steps: int) -> None:
        """A tuned grid asked for must exist for this sampler and step count."""
        if inputs.teleport:
            return
        try:
            spec.grid_used(sampler, steps, inputs.grid)
        except GridError as err:
            raise InputError(str(err), param="grid") from None

    def output_format(self, requested: str | None, tensor: bool = False) -> str:
        if tensor:
            return "raw"
        if requested not in (None, "png"):
            raise InputError(
                f"output format {requested!r} is not available for images; use 'png'",
                param="response_format",
            )
        return "png"

    def media_type(self, output_format: str) -> str:
        return ENCODINGS[output_format][1]

    def describe(self, spec) -> dict:
        """Size, and the step counts per sampler that have a tuned grid."""
        return {
            "size": f"{spec.image_shape[-1]}x{spec.image_shape[-2]}",
            "tuned_grids": spec.tuned_budgets(),
        }

    def start(self, job, model, dtype: torch.dtype, device: str) -> Started:
        inputs: ImageInputs = job.inputs
        labels = torch.tensor(inputs.labels, dtype=torch.long) if inputs.labels else None
        gen, cond, total = start_sampler(
            model,
            job.sampler,
            job.steps,
            row_seeds(job.seed, job.n),
            labels,
            inputs.teleport,
            inputs.guidance_scale,
            dtype,
            device,
            inputs.grid,
        )
        used = "teleport"
        if not inputs.teleport:
            used = model.spec.grid_used(job.sampler, job.steps, inputs.grid)
        return Started(gen, cond, total, used)

    def preview(self, model, job, x0: Tensor) -> bytes | None:
        if not job.preview:
            return None
        with torch.inference_mode():
            return encode_images(model.decode(x0[:1]), model.spec.data_range)[0]

    def finish(
        self, model, job, sample: Tensor, state: Any, should_stop: StopCheck = never
    ) -> tuple[list[bytes], ImageInfo]:
        encode = ENCODINGS[job.output_format][0]
        with torch.inference_mode():
            pixels = model.decode(sample)
        height, width = model.spec.image_shape[-2:]
        return encode(pixels, model.spec.data_range), ImageInfo(width, height, state or "")

    # -- Open Inference Protocol -------------------------------------------------------

    def signature(self, spec) -> Signature:
        """label BYTES [-1] (one class name per image; an unconditional model takes
        n INT32 [1] instead), seed INT64 [1], steps INT32 [1], sampler BYTES [1], grid
        BYTES [1] ("auto", "tuned" or "karras"), and where the model has them
        guidance_scale FP32 [1] and teleport BOOL [1]; returns
        image UINT8 [n, H, W, C] and seed INT64 [n]."""
        s = spec.sampling
        first = (
            TensorSpec("label", "BYTES", (-1,), required=True)
            if spec.labels
            else TensorSpec("n", "INT32", (1,))
        )
        inputs = [
            first,
            TensorSpec("seed", "INT64", (1,)),
            TensorSpec("steps", "INT32", (1,)),
            TensorSpec("sampler", "BYTES", (1,)),
            TensorSpec("grid", "BYTES", (1,)),
        ]
        if s.max_guidance != 1.0:
            inputs.append(TensorSpec("guidance_scale", "FP32", (1,)))
        if s.teleport_sigma is not None:
            inputs.append(TensorSpec("teleport", "BOOL", (1,)))
        channels, height, width = spec.image_shape[-3:]
        outputs = [
            TensorSpec("image", "UINT8", (-1, height, width, channels)),
            TensorSpec("seed", "INT64", (-1,)),
        ]
        return Signature.of(inputs, outputs)

    def from_tensors(self, spec, tensors: Mapping[str, list]) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if "label" in tensors:
            if not tensors["label"]:
                raise InputError("input 'label' is empty; send one label per image")
            if len(tensors["label"]) > spec.max_n:
                raise InputError(
                    f"input 'label' asks for {len(tensors['label'])} images; model {spec.name} "
                    f"makes at most {spec.max_n} per request; send several requests"
                )
            labels = []
            for i, value in enumerate(tensors["label"]):
                text = text_of("label", value)
                label = spec.label_id(text)
                if label is None:
                    raise _unknown_class(spec, text, f"input 'label' element {i}:")
                labels.append(label)
            fields.update(prompt=text_of("label", tensors["label"][0]), labels=labels)
            fields["n"] = len(labels)
        else:
            n = scalar(tensors, "n")
            n = 1 if n is None else n
            if not 1 <= n <= spec.max_n:
                raise InputError(f"input 'n' must be in 1..{spec.max_n} for model {spec.name}")
            fields["n"] = n
        fields["guidance_scale"] = scalar(tensors, "guidance_scale")
        fields["teleport"] = bool(scalar(tensors, "teleport"))
        grid = scalar(tensors, "grid")
        if grid is not None:
            fields["grid"] = text_of("grid", grid)
        return fields

    def to_tensors(self, spec, outputs: list[bytes], seeds: list[int], info: Info) -> dict:
        shape = self.signature(spec).outputs["image"].shape[1:]
        n = len(outputs)
        return {
            "image": OutputTensor("image", "UINT8", [n, *shape], b"".join(outputs)),
            "seed": OutputTensor("seed", "INT64", [n], np.asarray(seeds, "<i8").tobytes()),
        }
