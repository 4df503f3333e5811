"""The Open Inference Protocol (KServe v2) over fewstep's queue, for HTTP and gRPC alike.

Each model's OIP signature comes from its spec. An image model takes
    label           BYTES [-1]  one class name (or synonym) per image; its length is n
                                (an unconditional model takes n INT32 [1] instead)
    seed            INT64 [1]   optional; image i uses seed + i, as on /v1/images/generations
    steps           INT32 [1]   optional
    sampler         BYTES [1]   optional
    guidance_scale  FP32 [1]    optional, only on models with classifier-free guidance
    teleport        BOOL [1]    optional, only on models that ship Gaussian statistics
and returns image UINT8 [n, H, W, C] and seed INT64 [n]. Request parameters `priority`
and `timeout` follow Triton's schedule-policy extension.

The transports (service/api/v2.py, service/grpc/server.py) decode their tensors into
`Tensor`s; `build_infer_job` checks them against the signature and hands them to the
same build_job as the OpenAI-style endpoint, so an OIP request takes the same queue and
worker, and the same seed gives the same pixels.
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass
from functools import cache
from importlib import metadata

import numpy as np
from pydantic import ValidationError

from service.api.images import submit
from service.api.state import ServiceState, build_job
from service.errors import (
    Conflict,
    DeadlineExceeded,
    FewstepError,
    InvalidRequest,
    JobFailed,
    UnknownModel,
)
from service.jobs import Job, JobResult, JobState
from service.schemas import GenerationRequest

NUMPY_TYPES = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPES = (*NUMPY_TYPES, "BF16", "BYTES")
EXTENSIONS = ("binary_tensor_data", "parameters", "schedule_policy")

# Triton's schedule policy: priority level 1 runs first, 0 asks for the default level.
# fewstep's priorities -10..10 (higher first) are levels 21..1, the default 0 is level 11.
PRIORITY_LEVELS = 21
DEFAULT_PRIORITY_LEVEL = 11
SCHEDULE_PARAMETERS = ("priority", "timeout")


def server_version() -> str:
    try:
        return metadata.version("fewstep")
    except metadata.PackageNotFoundError:
        return "0.0.0"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model's signature; -1 is a dimension of any size."""

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


@cache
def signature(spec) -> Signature:
    """The OIP inputs and outputs of a model (an engines.repository.ModelSpec)."""
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
    return Signature({t.name: t for t in inputs}, {t.name: t for t in outputs})


def resolve(state: ServiceState, name: str, version: str = ""):
    """The ModelSpec of a model name and version string ("" is the default version)."""
    versions = state.specs.get(name)
    if versions is None:
        raise UnknownModel(f"unknown model {name!r}; available: {sorted(state.specs)}")
    if not version:
        return versions[state.default_versions[name]]
    if not version.isdigit() or int(version) not in versions:
        raise UnknownModel(
            f"model {name!r} has no version {version!r}; versions: "
            f"{[str(v) for v in sorted(versions)]}"
        )
    return versions[int(version)]


def server_metadata() -> dict:
    return {"name": "fewstep", "version": server_version(), "extensions": list(EXTENSIONS)}


def model_metadata(state: ServiceState, spec) -> dict:
    sig = signature(spec)
    return {
        "name": spec.name,
        "versions": [str(v) for v in sorted(state.specs[spec.name])],
        "platform": f"fewstep_{spec.kind}",
        "inputs": [t.metadata() for t in sig.inputs.values()],
        "outputs": [t.metadata() for t in sig.outputs.values()],
    }


# -- input tensors ----------------------------------------------------------------------


@dataclass
class Tensor:
    """An input tensor as a transport decoded it: its flattened, row-major values."""

    name: str
    datatype: str
    shape: list[int]
    values: list  # bytes for BYTES, else bool / int / float


def expect_input(spec, name: str, datatype: str, shape: object) -> int:
    """Check an input's name, datatype and shape against the model's signature, before
    its data is read; returns its element count."""
    sig = signature(spec)
    wanted = sig.inputs.get(name)
    if wanted is None:
        raise InvalidRequest(
            f"unexpected input {name!r} for model {spec.name}; its inputs are {list(sig.inputs)}"
        )
    if datatype not in DATATYPES:
        raise InvalidRequest(
            f"input {name!r} has unknown datatype {datatype!r}; model {spec.name} expects "
            f"{wanted.datatype}"
        )
    if datatype != wanted.datatype:
        raise InvalidRequest(
            f"input {name!r} has datatype {datatype}; model {spec.name} expects {wanted.datatype}"
        )
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidRequest(f"input {name!r}: shape must be a list of non-negative integers")
    fits = len(shape) == len(wanted.shape) and all(
        w in (-1, d) for w, d in zip(wanted.shape, shape, strict=True)
    )
    if not fits:
        raise InvalidRequest(
            f"input {name!r} has shape {shape}; model {spec.name} expects {list(wanted.shape)}"
        )
    count = math.prod(shape)
    if name == "label":
        if count == 0:
            raise InvalidRequest("input 'label' is empty; send one label per image")
        if count > spec.max_n:
            raise InvalidRequest(
                f"input 'label' asks for {count} images; model {spec.name} makes at most "
                f"{spec.max_n} per request; send several requests"
            )
    return count


def from_raw(name: str, datatype: str, raw: bytes, count: int) -> list:
    """Values of a tensor sent as raw little-endian bytes (binary data, raw contents)."""
    if datatype == "BYTES":
        values, at = [], 0
        while at < len(raw):
            if at + 4 > len(raw):
                raise InvalidRequest(f"input {name!r}: BYTES data ends inside a length prefix")
            (size,) = struct.unpack_from("<I", raw, at)
            at += 4
            if at + size > len(raw):
                raise InvalidRequest(f"input {name!r}: a BYTES element runs past the data")
            values.append(raw[at : at + size])
            at += size
        if len(values) != count:
            raise InvalidRequest(
                f"input {name!r} holds {len(values)} BYTES elements; its shape needs {count}"
            )
        return values
    dtype = NUMPY_TYPES.get(datatype)
    if dtype is None:
        raise InvalidRequest(f"input {name!r}: datatype {datatype} is not supported")
    if len(raw) != count * dtype.itemsize:
        raise InvalidRequest(
            f"input {name!r} has {len(raw)} bytes of data; {count} {datatype} elements "
            f"take {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype).tolist()


def _flatten(name: str, data: object, depth: int) -> list:
    if not isinstance(data, list):
        return [data]
    if depth == 0:
        raise InvalidRequest(f"input {name!r}: data is nested deeper than its shape")
    return [v for item in data for v in _flatten(name, item, depth - 1)]


def _json_ok(datatype: str, value: object) -> bool:
    if datatype == "BOOL":
        return isinstance(value, bool)
    if datatype == "BYTES":
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    dtype = NUMPY_TYPES[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return isinstance(value, int) and info.min <= value <= info.max
    return True


def from_json(name: str, datatype: str, data: object, count: int, depth: int) -> list:
    """Values of a tensor sent as JSON `data`, nested as the shape or flat."""
    values = _flatten(name, data, depth)
    if len(values) != count:
        raise InvalidRequest(
            f"input {name!r} holds {len(values)} elements; its shape needs {count}"
        )
    for value in values:
        if not _json_ok(datatype, value):
            raise InvalidRequest(f"input {name!r}: {value!r} is not a {datatype} value")
    if datatype == "BYTES":
        return [v.encode() for v in values]
    return values


def expect_outputs(spec, names: list[str]) -> None:
    """Refuse requested outputs the model does not have, before any compute."""
    outputs = signature(spec).outputs
    for name in names:
        if name not in outputs:
            raise InvalidRequest(
                f"unexpected output {name!r} for model {spec.name}; its outputs are {list(outputs)}"
            )
    if len(set(names)) != len(names):
        raise InvalidRequest("an output is requested twice; request each output once")


# -- request -> job -----------------------------------------------------------------------


def _scalar(tensors: dict[str, Tensor], name: str):
    tensor = tensors.get(name)
    return None if tensor is None else tensor.values[0]


def _text(name: str, value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise InvalidRequest(f"input {name!r} is not UTF-8 text") from None


def schedule(parameters: dict[str, object]) -> tuple[int, int | None]:
    """(fewstep priority, deadline in ms or None) from the `priority` and `timeout`
    request parameters (Triton: priority level 1 runs first, 0 or absent is the default;
    timeout in microseconds, 0 or absent is none)."""
    priority, deadline_ms = 0, None
    level = parameters.get("priority", 0)
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= PRIORITY_LEVELS:
        raise InvalidRequest(
            f"parameter 'priority' must be an integer level in 1..{PRIORITY_LEVELS} (1 runs "
            f"first, {DEFAULT_PRIORITY_LEVEL} is the default) or 0 for the default, "
            f"got {level!r}"
        )
    if level:
        priority = DEFAULT_PRIORITY_LEVEL - level
    timeout = parameters.get("timeout", 0)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
        raise InvalidRequest(
            f"parameter 'timeout' must be a non-negative integer of microseconds (0: none), "
            f"got {timeout!r}"
        )
    if timeout:
        deadline_ms = -(-timeout // 1000)
    return priority, deadline_ms


_PARAM_NAMES = {"deadline_ms": "parameter 'timeout'", "priority": "parameter 'priority'"}


def build_infer_job(
    state: ServiceState, spec, tensors: dict[str, Tensor], parameters: dict[str, object]
) -> Job:
    """Validate an OIP request (its inputs already checked by expect_input) and make
    the Job, through the same build_job as the OpenAI-style endpoint."""
    sig = signature(spec)
    for wanted in sig.inputs.values():
        if wanted.required and wanted.name not in tensors:
            raise InvalidRequest(
                f"input {wanted.name!r} ({wanted.datatype}, shape {list(wanted.shape)}) is "
                f"missing; model {spec.name} needs it"
            )
    labels: list[str] = []
    if "label" in tensors:
        for i, value in enumerate(tensors["label"].values):
            text = _text("label", value)
            if spec.label_id(text) is None:
                raise InvalidRequest(
                    f"input 'label' element {i}: {text!r} is not a class of model "
                    f"{spec.name}; use one of {list(spec.labels)} "
                    f"(synonyms: {sorted(spec.synonyms)})"
                )
            labels.append(text)
    n = len(labels) if labels else _scalar(tensors, "n")
    n = 1 if n is None else n
    if not 1 <= n <= spec.max_n:
        raise InvalidRequest(f"input 'n' must be in 1..{spec.max_n} for model {spec.name}")
    sampler = _scalar(tensors, "sampler")
    priority, deadline_ms = schedule(parameters)
    fields = {
        "model": f"{spec.name}@{spec.version}",
        "prompt": labels[0] if labels else "",
        "n": n,
        "sampler": None if sampler is None else _text("sampler", sampler),
        "steps": _scalar(tensors, "steps"),
        "seed": _scalar(tensors, "seed"),
        "guidance_scale": _scalar(tensors, "guidance_scale"),
        "teleport": bool(_scalar(tensors, "teleport")),
        "deadline_ms": deadline_ms,
        "priority": priority,
    }
    try:
        req = GenerationRequest(**fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = str(error["loc"][0]) if error.get("loc") else "request"
        where = _PARAM_NAMES.get(where, f"input {where!r}")
        raise InvalidRequest(f"{where}: {error['msg']}") from None
    job = build_job(req, state)
    if labels:
        job.labels = [spec.label_id(text) for text in labels]
    job.output_format = "raw"
    return job


# -- running it ---------------------------------------------------------------------------


def _failure(result: JobResult) -> FewstepError:
    if result.state is JobState.CANCELED:
        return Conflict("the request was canceled before it finished")
    if result.error_code == "deadline_exceeded":
        return DeadlineExceeded(f"{result.error}; raise the 'timeout' parameter or lower steps")
    if result.error_code == "invalid_parameter":
        return InvalidRequest(result.error or "invalid request")
    return JobFailed(result.error or "generation failed")


async def run(state: ServiceState, job: Job, endpoint: str) -> JobResult:
    """Submit the job to the service's queue and wait for its one result."""
    begin = time.perf_counter()
    try:
        job, _ = await submit(state, job, "")
        wait = state.settings.request_timeout_s
        if job.deadline is not None:
            wait = min(wait, max(job.deadline - time.time(), 0) + 1.0)
        result = await state.queue.result(job.id, wait)
        if result is None:
            await state.queue.cancel(job.id)
            raise DeadlineExceeded(
                f"no result within {wait:.1f} s; raise the 'timeout' parameter or lower steps"
            )
        if result.state is not JobState.SUCCEEDED:
            raise _failure(result)
    except FewstepError as exc:
        state.metrics.observe_request(job.model, job.sampler, endpoint, str(exc.status), None)
        raise
    state.metrics.observe_request(
        job.model, job.sampler, endpoint, "200", time.perf_counter() - begin
    )
    return result


@dataclass
class Output:
    """An output tensor: its raw little-endian bytes, and its values for JSON."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes

    def values(self) -> list:
        if self.datatype == "UINT8":
            return list(self.raw)
        return np.frombuffer(self.raw, NUMPY_TYPES[self.datatype]).tolist()


def outputs(spec, result: JobResult, names: list[str]) -> list[Output]:
    """The requested outputs (all of them if `names` is empty), in the order asked."""
    sig = signature(spec)
    n = len(result.outputs)
    made = {
        "image": lambda: Output(
            "image", "UINT8", [n, *sig.outputs["image"].shape[1:]], b"".join(result.outputs)
        ),
        "seed": lambda: Output(
            "seed", "INT64", [n], np.asarray(result.seeds, NUMPY_TYPES["INT64"]).tobytes()
        ),
    }
    return [made[name]() for name in names or sig.outputs]


def response_parameters(job: Job, result: JobResult) -> dict[str, object]:
    """What the OpenAI-style response reports besides the images: sampler, steps, NFE,
    where the time went (seconds), runtime and model fingerprint."""
    return {
        "sampler": job.sampler,
        "steps": job.steps,
        "nfe": result.nfe,
        "queue_seconds": result.queue_seconds,
        "compute_seconds": result.compute_seconds,
        "forward_seconds": result.forward_seconds,
        "total_seconds": result.total_seconds,
        "runtime": result.runtime,
        "fingerprint": result.fingerprint,
    }
