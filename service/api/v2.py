"""The Open Inference Protocol (KServe v2) over HTTP, as Triton serves it.

Health, server and model metadata, and infer on the service's queue (service/oip.py holds
what HTTP and gRPC share). Tensors come as JSON `data` or in Triton's binary tensor data
extension: the JSON header is the first Inference-Header-Content-Length bytes of the body,
each input with `parameters.binary_data_size` takes its bytes from what follows, in order;
outputs asked for with `binary_data` (or all of them with `binary_data_output`) come back
the same way. gzip and deflate request bodies are accepted (tritonclient's
request_compression_algorithm). Errors are {"error": "..."} (service/app.py renders them).

Infer takes `Content-Type: application/json` or `application/octet-stream` (binary tensor
data), or none at all as tritonclient sends, but then only from a non-browser client: a
cross-site browser request carries `Origin`, and a page must not post jobs to a server on
the user's machine (the types an HTML form can send are refused too). Health stays open;
everything else needs the caller's key when keys are configured.
"""

from __future__ import annotations

import json
import zlib

from fastapi import APIRouter, Request, Response

from service import oip
from service.errors import Forbidden, InvalidRequest, NotReady, UnsupportedMediaType
from service.parsing import parse_uint
from service.security import Principal
from service.state import ServiceState

from .common import Caller, State

router = APIRouter(tags=["kserve-v2"])

HEADER_LENGTH = "inference-header-content-length"
CONTENT_TYPES = ("application/json", "application/octet-stream")
REQUEST_KEYS = ("id", "parameters", "inputs", "outputs")
INPUT_KEYS = ("name", "shape", "datatype", "parameters", "data")


@router.get("/v2")
async def server_metadata(_: Caller) -> dict:
    return oip.server_metadata()


@router.get("/v2/health/live")
async def server_live() -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready")
async def server_ready(state: State) -> Response:
    # the protocol: 200 is true, a 4xx false
    return Response(status_code=200 if state.ready else 400)


def _metadata(state: ServiceState, name: str, version: str) -> dict:
    state.require_ready()
    return oip.model_metadata(state, state.resolve(name, version))


@router.get("/v2/models/{model_name}")
async def model_metadata(model_name: str, state: State, _: Caller) -> dict:
    return _metadata(state, model_name, "")


@router.get("/v2/models/{model_name}/versions/{model_version}")
async def model_version_metadata(
    model_name: str, model_version: str, state: State, _: Caller
) -> dict:
    return _metadata(state, model_name, model_version)


def _ready(state: ServiceState, name: str, version: str) -> Response:
    if not state.ready:
        raise InvalidRequest("models are still loading; retry shortly")
    state.resolve(name, version)  # unknown: 404, also "not ready" to the protocol
    return Response(status_code=200)


@router.get("/v2/models/{model_name}/ready")
async def model_ready(model_name: str, state: State) -> Response:
    return _ready(state, model_name, "")


@router.get("/v2/models/{model_name}/versions/{model_version}/ready")
async def model_version_ready(model_name: str, model_version: str, state: State) -> Response:
    return _ready(state, model_name, model_version)


@router.post("/v2/models/{model_name}/infer")
async def infer(model_name: str, request: Request, state: State, caller: Caller) -> Response:
    return await _infer(state, request, caller, model_name, "")


@router.post("/v2/models/{model_name}/versions/{model_version}/infer")
async def infer_version(
    model_name: str, model_version: str, request: Request, state: State, caller: Caller
) -> Response:
    return await _infer(state, request, caller, model_name, model_version)


def _check_content_type(request: Request) -> None:
    """JSON, binary tensor data, or (tritonclient) no type from a client that is no web
    page; anything else, such as what an HTML form or a page's plain text post sends, 415."""
    declared = request.headers.get("content-type")
    if declared is None:
        if request.headers.get("origin") is not None:
            raise Forbidden(
                "a browser request to infer needs Content-Type: application/json (cross-site "
                "requests without it are refused)"
            )
        return
    media = declared.partition(";")[0].strip().lower()
    if media not in CONTENT_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {declared[:60]!r} is not accepted by infer; send "
            "application/json, or application/octet-stream with Inference-Header-Content-Length"
        )


def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    if encoding is None or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidRequest(f"Content-Encoding {encoding!r} is not supported; use gzip or deflate")
    inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise InvalidRequest(f"the request body is not valid {encoding} data") from None
    if len(data) > limit:
        raise InvalidRequest(f"the decompressed request body is over {limit} bytes")
    return data


def _split(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON header of a request and the binary data after it."""
    binary = b""
    if header_length is not None:
        length = parse_uint(header_length, name="header Inference-Header-Content-Length")
        if length > len(body):
            raise InvalidRequest(
                f"Inference-Header-Content-Length must be the byte length of the JSON header, "
                f"at most the body's {len(body)} bytes, got {length}"
            )
        body, binary = body[:length], body[length:]
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        hint = "" if binary or header_length else " (binary data needs the header length)"
        raise InvalidRequest(f"the request's JSON header is not valid JSON{hint}") from None
    if not isinstance(request, dict):
        raise InvalidRequest("the request must be a JSON object with 'inputs'")
    unknown = sorted(set(request) - set(REQUEST_KEYS))
    if unknown:
        raise InvalidRequest(f"unknown request field(s) {unknown}; the fields are {REQUEST_KEYS}")
    return request, binary


def _object(value: object, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    return value


def _inputs(spec, inputs: object, binary: bytes) -> dict[str, oip.Tensor]:
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest("'inputs' must be a non-empty list of tensors")
    tensors: dict[str, oip.Tensor] = {}
    at = 0
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise InvalidRequest(f"inputs[{i}] must be a JSON object")
        unknown = sorted(set(tensor) - set(INPUT_KEYS))
        if unknown:
            raise InvalidRequest(f"inputs[{i}]: unknown field(s) {unknown}; remove them")
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not isinstance(name, str):
            raise InvalidRequest(f"inputs[{i}] needs a 'name'")
        if name in tensors:
            raise InvalidRequest(f"input {name!r} is given twice")
        count = oip.expect_input(spec, name, datatype, shape)
        parameters = _object(tensor.get("parameters"), f"input {name!r}: parameters")
        extra = sorted(set(parameters) - {"binary_data_size"})
        if extra:
            raise InvalidRequest(
                f"input {name!r}: parameter(s) {extra} are not supported; only binary_data_size"
            )
        size = parameters.get("binary_data_size")
        if size is None:
            if "data" not in tensor:
                raise InvalidRequest(f"input {name!r} has neither 'data' nor binary_data_size")
            values = oip.from_json(name, datatype, tensor["data"], count, len(shape))
        else:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidRequest(f"input {name!r}: binary_data_size must be a byte count")
            if "data" in tensor:
                raise InvalidRequest(f"input {name!r} has both 'data' and binary_data_size")
            if at + size > len(binary):
                raise InvalidRequest(
                    f"input {name!r}: binary_data_size {size} runs past the {len(binary)} "
                    "bytes of binary data after the JSON header"
                )
            values = oip.from_raw(name, datatype, binary[at : at + size], count)
            at += size
        tensors[name] = oip.Tensor(name, datatype, shape, values)
    if at != len(binary):
        raise InvalidRequest(
            f"{len(binary) - at} bytes of binary data after the inputs belong to no input; "
            "check binary_data_size and Inference-Header-Content-Length"
        )
    return tensors


def _requested(spec, outputs: object, binary_default: bool) -> list[tuple[str, bool]]:
    """(name, binary) of each output to return; all of them if none are asked for."""
    if outputs is not None and not isinstance(outputs, list):
        raise InvalidRequest("'outputs' must be a list of requested outputs")
    if not outputs:
        return [(name, binary_default) for name in oip.signature(spec).outputs]
    requested = []
    for i, output in enumerate(outputs):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise InvalidRequest(f"outputs[{i}] must be an object with a 'name'")
        unknown = sorted(set(output) - {"name", "parameters"})
        if unknown:
            raise InvalidRequest(f"outputs[{i}]: unknown field(s) {unknown}; remove them")
        name = output["name"]
        parameters = _object(output.get("parameters"), f"output {name!r}: parameters")
        extra = sorted(set(parameters) - {"binary_data"})
        if extra:
            raise InvalidRequest(
                f"output {name!r}: parameter(s) {extra} are not supported; only binary_data"
            )
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise InvalidRequest(f"output {name!r}: binary_data must be true or false")
        requested.append((name, binary))
    oip.expect_outputs(spec, [name for name, _ in requested])
    return requested


def _parameters(request: dict) -> tuple[dict, bool]:
    """The scheduling parameters, and binary_data_output."""
    parameters = dict(_object(request.get("parameters"), "parameters"))
    binary = parameters.pop("binary_data_output", False)
    if not isinstance(binary, bool):
        raise InvalidRequest("parameter 'binary_data_output' must be true or false")
    unknown = sorted(set(parameters) - set(oip.SCHEDULE_PARAMETERS))
    if unknown:
        raise InvalidRequest(
            f"unknown request parameter(s) {unknown}; fewstep reads priority, timeout, "
            "quality and binary_data_output"
        )
    return parameters, binary


async def _infer(
    state: ServiceState, request: Request, caller: Principal, name: str, version: str
) -> Response:
    if not state.ready:
        raise NotReady("models are still loading; retry shortly", retry_after=2)
    _check_content_type(request)
    spec = state.resolve(name, version)
    body = _decompress(
        await request.body(),
        request.headers.get("content-encoding"),
        state.settings.max_body_bytes,
    )
    req, binary = _split(body, request.headers.get(HEADER_LENGTH))
    request_id = req.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidRequest("'id' must be a string")
    parameters, binary_output = _parameters(req)
    tensors = _inputs(spec, req.get("inputs"), binary)
    requested = _requested(spec, req.get("outputs"), binary_output)
    job, result = await oip.infer(state, spec, tensors, parameters, "v2_http", caller)
    flags = dict(requested)
    response: dict = {"model_name": spec.name, "model_version": str(spec.version)}
    if request_id:
        response["id"] = request_id
    response["parameters"] = oip.response_parameters(job, result)
    tensors_out, chunks = [], []
    for output in oip.outputs(spec, result, [name for name, _ in requested]):
        tensor = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if flags[output.name]:
            tensor["parameters"] = {"binary_data_size": len(output.raw)}
            chunks.append(output.raw)
        else:
            tensor["data"] = oip.values(output)
        tensors_out.append(tensor)
    response["outputs"] = tensors_out
    header = json.dumps(response, separators=(",", ":")).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *chunks]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
