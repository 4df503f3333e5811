"""The Modality contract: everything that differs between images and speech, in one place.

A modality answers, for one model spec, every question the layers above would otherwise
answer with a branch on the model's kind:

- **inputs**: which request fields it takes, their limits, and the typed payload a Job
  carries across the queue (`parse`);
- **cost**: rows x steps of a request, known before it is admitted (`cost`), and what
  only the model can tell before any sampling (speech: frames after the front end,
  `check`);
- **start**: grid, seeded noise and conditioning, i.e. a started sampler (`start`);
- **batching**: which pending calls may share a forward pass and how rows of different
  sizes are joined and split again (`batch_key`, `collate`);
- **output**: how a finished sample becomes bytes (decode, vocode, encode: `finish`), and
  what a step preview is (`preview`);
- **OIP**: the model's Open Inference Protocol signature and how its tensors map to the
  request fields and back (`signature`, `from_tensors`, `to_tensors`).

The worker, admission and the front ends call these; none of them looks at a model's kind.
Payloads are small dataclasses that convert to and from plain dicts (JSON, never pickle).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from engines.samplers import SamplerGen, cat_cond, split_rows


class InputError(ValueError):
    """A request's inputs do not fit the model. The message says what to change; `param`
    names the request field (None where the front end knows better)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class Unavailable(RuntimeError):
    """Something a modality needs is unavailable for now (the speech front end hung or
    died and is being restarted): the same request can be retried (a 503, not a 400)."""


StopCheck = Callable[[], bool]


def never() -> bool:
    return False


_FLAT = (int, float, str, bool)


class Payload:
    """Base of the typed records a modality puts on a Job or JobResult. Subclasses are
    dataclasses with a class-level `kind` (the modality's name)."""

    kind: ClassVar[str]

    def to_dict(self) -> dict:
        """{"kind": ..., field: value, ...}, as `dataclasses.asdict` gives it. Payloads are
        flat (numbers, strings, lists of them), so the fields are copied one level deep,
        lists copied: asdict's recursive deep copy cost a job crossing the Redis queue more
        than its Lua script. Anything nested goes through asdict."""
        data = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list) and all(type(v) in _FLAT for v in value):
                value = list(value)
            elif type(value) not in _FLAT and value is not None:
                return {"kind": self.kind, **dataclasses.asdict(self)}
            data[f.name] = value
        return data


class Inputs(Payload):
    """A request's modality-specific inputs, validated."""

    def rows(self, n: int) -> int:
        """Rows the request adds to a forward pass for n samples."""
        return n

    def samples(self, n: int) -> int:
        """Samples computed for n outputs (best_of candidates and steering particles
        count): what quotas and the queue's bound count."""
        return n

    def static_key(self) -> tuple:
        """What, besides sampler and steps, must match for static batching."""
        return ()

    def revised_prompt(self, spec) -> str | None:
        """The canonical prompt of the samples (a class name), if any."""
        return None


class Info(Payload):
    """What a finished request made, beyond its bytes."""

    @property
    def duration(self) -> float:
        """Seconds of time-based media made (0 for still images)."""
        return 0.0

    def output_seeds(self) -> list[int] | None:
        """The seed of each output where it is not the request's row seed (a best_of
        pick: its candidate's seed), else None."""
        return None

    def searched(self) -> tuple[str, int] | None:
        """(method, candidate rows sampled) of a best_of / steering request, else None."""
        return None


@dataclass(frozen=True)
class Cost:
    """What a request costs before it runs: rows in each forward pass times steps."""

    rows: int
    steps: int

    @property
    def row_steps(self) -> int:
        return self.rows * self.steps


@dataclass
class Started:
    """A started request: its sampler generator, conditioning, NFE and what `finish`
    needs later (speech: each sentence's frames)."""

    gen: SamplerGen
    cond: dict[str, Tensor] | None
    nfe: int
    state: Any = None


@dataclass(frozen=True)
class TensorSpec:
    """One OIP input or output of a model's signature; -1 is a dimension of any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    required: bool = False

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    @classmethod
    def of(cls, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> Signature:
        return cls({t.name: t for t in inputs}, {t.name: t for t in outputs})


@dataclass(frozen=True)
class OutputTensor:
    """An OIP output tensor as raw little-endian bytes."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes


Collated = tuple[Tensor, dict[str, Tensor] | None, Callable[[Tensor], list[Tensor]]]


class Modality(ABC):
    """One modality (see the module docstring); a stateless singleton per modality."""

    name: ClassVar[str]  # "image", "speech"
    noun: ClassVar[str]  # what its models make, for messages: "images", "speech"
    endpoint: ClassVar[str]  # the OpenAI-style endpoint that serves it
    inputs_type: ClassVar[type[Inputs]]
    info_type: ClassVar[type[Info]]
    # whether `check` and `start` may block (a front-end process): admission and the worker
    # then always run them in a thread, never on the event loop; else they may run inline
    # (a thread hop costs the hot path of small models about a millisecond)
    may_block: ClassVar[bool] = False

    # -- requests ----------------------------------------------------------------------

    @abstractmethod
    def parse(self, spec, fields: Mapping[str, Any]) -> tuple[Inputs, int]:
        """Validate a request's modality fields against the model: (payload, samples n).
        Raises InputError."""

    @abstractmethod
    def output_format(self, requested: str | None, tensor: bool = False) -> str:
        """The encoding of the outputs: `requested` if this server can make it, the
        modality's default for None, its raw tensor encoding with `tensor` (OIP).
        Raises InputError."""

    @abstractmethod
    def media_type(self, output_format: str) -> str:
        """The media type of outputs in `output_format`."""

    def cost(self, spec, inputs: Inputs, n: int, steps: int) -> Cost:
        """Rows x steps of a request, before it is admitted."""
        return Cost(inputs.rows(n), steps)

    def plan(self, spec, inputs: Inputs, sampler: str, steps: int) -> None:
        """Refuse inputs that cannot work with the request's sampler and steps (checked
        once both are known). Raises InputError. The default: nothing to check."""
        return None

    def check(self, spec, inputs: Inputs, model) -> None:
        """Refuse, before admission, a request whose cost only the model can tell (speech:
        frames after the front end, speed included). `model` is the LoadedModel, or None in
        a process without weights (check what can be checked without them). May block (a
        front-end process): call it off the event loop. Raises InputError, Unavailable.
        The default: nothing beyond `parse` and `cost` to check."""
        return None

    def describe(self, spec) -> dict:
        """What /v1/models shows of this modality beyond the common fields."""
        return {}

    # -- the worker --------------------------------------------------------------------

    @abstractmethod
    def start(self, job, model, dtype: torch.dtype, device: str) -> Started:
        """Grid, seeded noise and conditioning for the job: its sampler, not yet run.
        Raises ValueError (SamplerError, ScheduleError...) for arguments that cannot work,
        Unavailable for what may work on a retry. May block: the worker runs it in its
        compute thread."""

    def batch_key(self, x: Tensor) -> tuple:
        """Pending calls with equal keys (and model) may share a forward pass."""
        return tuple(x.shape[1:])

    def collate(self, xs: list[Tensor], conds: list) -> Collated:
        """One batch from the requests' pending rows, and how to split its output back."""
        sizes = [len(x) for x in xs]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)  # one request: no copy of its rows
        return x, cat_cond(conds), lambda out: split_rows(out, sizes)

    def preview(self, model, job, x0: Tensor) -> bytes | None:
        """A small preview of the current x0 for a step event, or None."""
        return None

    @abstractmethod
    def finish(
        self, model, job, sample: Tensor, state: Any, should_stop: StopCheck = never
    ) -> tuple[list[bytes], Info]:
        """The finished sample as encoded outputs (one per sample, or one for the whole
        request) and what they are. Long finishing work (vocoding) gives up with an
        exception as soon as should_stop() is true (the job was canceled or is late)."""

    def finish_many(
        self, model, jobs: list, samples: list[Tensor], states: list, stops: list[StopCheck]
    ) -> list[tuple[list[bytes], Info] | Exception]:
        """`finish` for several jobs of one model that finished in the same forward pass:
        each job's outputs and info, or the exception its own `finish` raised. A modality
        whose finishing work batches across requests (one vocoder pass) overrides it; the
        outputs must be exactly what `finish` gives each job alone."""
        out: list[tuple[list[bytes], Info] | Exception] = []
        for job, sample, state, stop in zip(jobs, samples, states, stops, strict=True):
            try:
                out.append(self.finish(model, job, sample, state, stop))
            except Exception as exc:  # the caller turns it into that job's failure
                out.append(exc)
        return out

    # -- Open Inference Protocol -------------------------------------------------------

    @abstractmethod
    def signature(self, spec) -> Signature:
        """The model's OIP inputs and outputs."""

    @abstractmethod
    def from_tensors(self, spec, tensors: Mapping[str, list]) -> dict[str, Any]:
        """The request fields an OIP request's input values stand for (values already
        checked against the signature; BYTES values are bytes)."""

    @abstractmethod
    def to_tensors(self, spec, outputs: list[bytes], seeds: list[int], info: Info) -> dict:
        """{name: OutputTensor} of every output of the signature."""


def text_of(name: str, value: bytes) -> str:
    """A BYTES tensor element as text; InputError if it is not UTF-8."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise InputError(f"input {name!r} is not UTF-8 text") from None


def scalar(tensors: Mapping[str, list], name: str):
    values = tensors.get(name)
    return None if values is None else values[0]
