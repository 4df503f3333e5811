"""The Open Inference Protocol (KServe v2) data plane, shared by HTTP and gRPC.

The transports (service/api/v2.py, service/grpc/server.py) decode their wire format into
`Tensor`s; this module checks them against the model's signature (its modality's:
engines.modalities), decodes values (JSON `data`, or raw little-endian bytes for binary
data and raw contents), maps them to an admission Request (`request`), runs it through
the same admission as the OpenAI-style endpoints (`infer`), and turns the result into
output tensors. So an OIP request takes the same queue and worker, and the same seed gives
the same pixels. Request parameters `priority` and `timeout` follow Triton's
schedule-policy extension; fewstep's own `quality` ("auto" with a `timeout`: the most steps
that meet the deadline at the current load) is the OpenAI-style field of that name.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from functools import cache
from importlib import metadata

import numpy as np
from pydantic import ValidationError

from engines.modalities import InputError, OutputTensor, Signature, modality_of
from engines.modalities.base import scalar, text_of
from service import admission
from service.errors import InvalidRequest
from service.jobs import Job, JobResult
from service.schemas import REQUEST_MODELS
from service.security import ANONYMOUS, Principal
from service.state import ServiceState

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
SCHEDULE_PARAMETERS = ("priority", "timeout", "quality")


def server_version() -> str:
    try:
        return metadata.version("fewstep")
    except metadata.PackageNotFoundError:
        return "0.0.0"


@cache
def signature(spec) -> Signature:
    """The OIP inputs and outputs of a model (an engines.repository.ModelSpec)."""
    return modality_of(spec).signature(spec)


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
    return math.prod(shape)


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
    if datatype not in NUMPY_TYPES and datatype != "BYTES":
        raise InvalidRequest(
            f"input {name!r}: {datatype} values cannot be sent as JSON data; send the tensor "
            "as FP32, or as raw bytes (binary_data_size)"
        )
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


def _text(name: str, value: bytes) -> str:
    try:
        return text_of(name, value)
    except InputError as err:
        raise InvalidRequest(err.message) from None


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


_PARAM_NAMES = {
    "deadline_ms": "parameter 'timeout'",
    "priority": "parameter 'priority'",
    "quality": "parameter 'quality'",
}


def validated(model: type, fields: dict):
    """The request model built from an OIP request's fields; a 400 naming the input."""
    try:
        return model(**fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = str(error["loc"][0]) if error.get("loc") else "request"
        where = _PARAM_NAMES.get(where, f"input {where!r}")
        raise InvalidRequest(f"{where}: {error['msg']}") from None


def request(spec, tensors: dict[str, Tensor], parameters: dict[str, object]) -> admission.Request:
    """An OIP request (its inputs already checked by expect_input) as an admission Request.

    The modality maps the tensors to its request fields; the values are checked with the
    same wire model as the OpenAI-style endpoint of that modality.
    """
    modality = modality_of(spec)
    values = {name: tensor.values for name, tensor in tensors.items()}
    try:
        fields = modality.from_tensors(spec, values)
    except InputError as err:
        raise InvalidRequest(err.message) from None
    for wanted in signature(spec).inputs.values():
        if wanted.required and wanted.name not in tensors:
            raise InvalidRequest(
                f"input {wanted.name!r} ({wanted.datatype}, shape {list(wanted.shape)}) is "
                f"missing; model {spec.name} needs it"
            )
    sampler = scalar(values, "sampler")
    priority, deadline_ms = schedule(parameters)
    quality = parameters.get("quality", "fixed")
    if quality == "auto" and deadline_ms is None:
        raise InvalidRequest(
            "parameter 'quality' \"auto\" picks the most steps that meet the request's "
            "deadline; send the 'timeout' parameter (microseconds), or quality \"fixed\""
        )
    common = {
        "model": f"{spec.name}@{spec.version}",
        "sampler": None if sampler is None else _text("sampler", sampler),
        "steps": scalar(values, "steps"),
        "seed": scalar(values, "seed"),
        "deadline_ms": deadline_ms,
        "priority": priority,
        "quality": quality,
    }
    wire = REQUEST_MODELS[modality.name]
    known = {k: v for k, v in fields.items() if k in wire.model_fields}
    checked = validated(wire, {**common, **known})
    return admission.Request(
        **{k: getattr(checked, k) for k in common},
        fields={**fields, **checked.model_dump(include=set(known))},
        tensor_output=True,
    )


# -- running it ---------------------------------------------------------------------------


async def infer(
    state: ServiceState,
    spec,
    tensors: dict[str, Tensor],
    parameters: dict,
    endpoint: str,
    principal: Principal = ANONYMOUS,
) -> tuple[Job, JobResult]:
    """Admit an OIP request for `principal`, run it on the service's queue, wait for its
    one result."""
    job = (await admission.accept(state, request(spec, tensors, parameters), principal)).job
    return job, await admission.run(state, job, endpoint, admission.OIP, principal)


def values(output: OutputTensor) -> list:
    """An output tensor's values, for JSON."""
    if output.datatype == "UINT8":
        return list(output.raw)
    return np.frombuffer(output.raw, NUMPY_TYPES[output.datatype]).tolist()


def outputs(spec, result: JobResult, names: list[str]) -> list[OutputTensor]:
    """The requested outputs (all of them if `names` is empty), in the order asked."""
    made = modality_of(spec).to_tensors(spec, result.outputs, result.seeds, result.info)
    return [made[name] for name in names or signature(spec).outputs]


def response_parameters(job: Job, result: JobResult) -> dict[str, object]:
    """What the OpenAI-style response reports besides the images: sampler, steps, NFE,
    where the time went (seconds), runtime and model fingerprint."""
    return {
        "sampler": job.sampler,
        "steps": job.steps,
        "quality": "auto" if job.step_budgets else "fixed",
        "nfe": result.nfe,
        "queue_seconds": result.queue_seconds,
        "compute_seconds": result.compute_seconds,
        "forward_seconds": result.forward_seconds,
        "total_seconds": result.total_seconds,
        "runtime": result.runtime,
        "fingerprint": result.fingerprint,
    }
