"""Images: class-conditional (or unconditional) samples encoded as PNG or raw pixels.

Inputs are one class id per image, a guidance scale and the teleport flag; a request's
rows double under classifier-free guidance. Latent models are decoded to pixels before a
preview or an output is encoded (`LoadedModel.decode`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from engines.media import ENCODINGS, encode_images
from engines.noise import row_seeds
from engines.repository import GRID_CHOICES, GridError
from engines.sampling import start_sampler
from engines.scaling import Choice, Search, candidate_seeds
from engines.scaling import check as check_search

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
    candidates: int = 1  # best_of or steering.particles: sampled rows per image
    resample_every: int = 0  # steering: resample every this many steps; 0: best-of
    grid: str = "auto"  # "auto" (tuned where model.yaml has one), "tuned" or "karras"

    def rows(self, n: int) -> int:
        """Every candidate is a row; classifier-free guidance adds an unconditional one."""
        return self.samples(n) * (2 if self.guidance_scale != 1.0 else 1)

    def samples(self, n: int) -> int:
        return n * self.candidates

    def search(self, spec) -> Search:
        scale = spec.verifier.potential_scale if spec.verifier else 1.0
        return Search(self.candidates, self.resample_every, scale)

    def static_key(self) -> tuple:
        return (self.guidance_scale, self.teleport, self.grid)

    def revised_prompt(self, spec) -> str | None:
        return spec.labels[self.labels[0]] if self.labels else None


@dataclass
class ImageInfo(Info):
    kind: ClassVar[str] = "image"

    width: int = 0
    height: int = 0
    # best_of / steering: the method, the verifier, its score and the seed of each pick
    method: str = "plain"
    candidates: int = 1
    verifier: str = ""
    scores: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    resamples: int = 0
    grid: str = ""  # the grid the samples were drawn on: "tuned", "karras" or "teleport"

    def output_seeds(self) -> list[int] | None:
        return self.seeds or None

    def searched(self) -> tuple[str, int] | None:
        if self.method == "plain":
            return None
        return self.method, self.candidates * len(self.scores)


@dataclass
class Searched:
    """A best_of / steering request's state between start and finish."""

    search: Search
    choice: Choice
    seeds: list[int]  # of every row, image-major
    verifier: str


def _search_fields(spec, fields: Mapping[str, Any]) -> tuple[int, int]:
    """(candidates, resample_every) from best_of / steering, checked against the model."""
    best, steer = fields.get("best_of"), fields.get("steering")
    if best is not None and steer is not None:
        raise InputError(
            "best_of and steering are alternatives; send one of them", param="steering"
        )
    if best is None and steer is None:
        return 1, 0
    what = "best_of" if best is not None else "steering"
    v = spec.verifier
    if v is None:
        raise InputError(
            f"model {spec.name} has no verifier, so {what} is not available; omit it "
            "(a model gets one with a verifier: section in its model.yaml)",
            param=what,
        )
    k = best if best is not None else steer.get("particles")
    param = "best_of" if best is not None else "steering.particles"
    if not _is_count(k) or not 1 <= k <= v.max_candidates:
        raise InputError(
            f"{param} must be an integer in 1..{v.max_candidates} for model {spec.name}, got {k!r}",
            param=param,
        )
    if steer is None:
        return k, 0
    every = steer.get("resample_every", 1)
    if not _is_count(every) or every < 1:
        raise InputError(
            f"steering.resample_every must be an integer >= 1 (steps between resamplings), "
            f"got {every!r}",
            param="steering.resample_every",
        )
    return k, every


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
        candidates, every = _search_fields(spec, fields)
        return ImageInputs(labels, guidance, teleport, candidates, every, grid), n

    def plan(self, spec, inputs: ImageInputs, sampler: str, steps: int) -> None:
        problem = check_search(inputs.search(spec), sampler, steps, inputs.teleport)
        if problem:
            raise InputError(problem, param="steering")
        if inputs.teleport:
            return
        try:  # a tuned grid asked for must exist for this sampler and step count
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
        shown: dict = {"size": f"{spec.image_shape[-1]}x{spec.image_shape[-2]}"}
        if spec.verifier is not None:  # best_of / steering are available, up to this k
            v = spec.verifier
            name = f"classifier:{v.classifier}" if v.name == "classifier" else v.name
            shown["verifier"] = {"name": name, "max_candidates": v.max_candidates}
        shown["tuned_grids"] = spec.tuned_budgets()  # step counts per sampler
        return shown

    def start(self, job, model, dtype: torch.dtype, device: str) -> Started:
        inputs: ImageInputs = job.inputs
        labels = torch.tensor(inputs.labels, dtype=torch.long) if inputs.labels else None
        if inputs.candidates > 1:
            return self._start_search(job, model, labels, dtype, device)
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
            grid=inputs.grid,
        )
        return Started(gen, cond, total)

    def _start_search(self, job, model, labels, dtype: torch.dtype, device: str) -> Started:
        """best_of / steering: n * k rows, the model's verifier scoring their x0."""
        inputs: ImageInputs = job.inputs
        verifier = model.verifier
        if verifier is None:
            raise ValueError(f"model {job.model} has no verifier loaded; omit best_of/steering")
        search, k = inputs.search(model.spec), inputs.candidates
        seeds = candidate_seeds(job.seed, job.n, k)
        row_labels = None if labels is None else labels.repeat_interleave(k)

        def verify(x0: Tensor) -> Tensor:
            with torch.inference_mode():
                return verifier.score(model.decode(x0), row_labels)

        choice = Choice()
        gen, cond, total = start_sampler(
            model,
            job.sampler,
            job.steps,
            seeds,
            row_labels,
            inputs.teleport,
            inputs.guidance_scale,
            dtype,
            device,
            search=search,
            verify=verify,
            choice=choice,
            grid=inputs.grid,
        )
        return Started(gen, cond, total, Searched(search, choice, seeds, verifier.name))

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
        info = ImageInfo(width, height)
        if isinstance(state, Searched):
            choice = state.choice
            info = ImageInfo(
                width,
                height,
                state.search.method,
                state.search.candidates,
                state.verifier,
                choice.scores,
                [state.seeds[r] for r in choice.rows],
                choice.resamples,
            )
        info.grid = "teleport"
        if not job.inputs.teleport:
            info.grid = model.spec.grid_used(job.sampler, job.steps, job.inputs.grid)
        return encode(pixels, model.spec.data_range), info

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
        if spec.verifier is not None:  # best_of / steering; verifier_score empty without
            inputs += [
                TensorSpec("best_of", "INT32", (1,)),
                TensorSpec("steering_particles", "INT32", (1,)),
                TensorSpec("resample_every", "INT32", (1,)),
            ]
            outputs.append(TensorSpec("verifier_score", "FP32", (-1,)))
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
        fields["best_of"] = scalar(tensors, "best_of")
        particles, every = scalar(tensors, "steering_particles"), scalar(tensors, "resample_every")
        if particles is not None:
            fields["steering"] = {"particles": particles, "resample_every": every or 1}
        elif every is not None:
            raise InputError("input 'resample_every' needs 'steering_particles' beside it")
        grid = scalar(tensors, "grid")
        if grid is not None:
            fields["grid"] = text_of("grid", grid)
        return fields

    def to_tensors(self, spec, outputs: list[bytes], seeds: list[int], info: Info) -> dict:
        shape = self.signature(spec).outputs["image"].shape[1:]
        n = len(outputs)
        made = {
            "image": OutputTensor("image", "UINT8", [n, *shape], b"".join(outputs)),
            "seed": OutputTensor("seed", "INT64", [n], np.asarray(seeds, "<i8").tobytes()),
        }
        if spec.verifier is not None:
            scores = getattr(info, "scores", [])
            raw = np.asarray(scores, "<f4").tobytes()
            made["verifier_score"] = OutputTensor("verifier_score", "FP32", [len(scores)], raw)
        return made
