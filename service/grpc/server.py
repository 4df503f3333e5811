"""inference.GRPCInferenceService on the service's queue, and grpc.health.v1 for probes.

Runs on grpc.aio in the event loop of the HTTP app (started by its lifespan), so both
surfaces share one queue and one worker. Validation and results come from service/oip.py,
the same as over HTTP; a FewstepError becomes the status its `grpc_code` names, with the
message as details (tritonclient raises it as InferenceServerException). Calls other than
the liveness and readiness ones carry the caller's key as `authorization` metadata
(tritonclient's `headers=`), checked as the HTTP header is.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from service import oip
from service.errors import FewstepError, InvalidRequest, NotReady
from service.security import Principal
from service.state import ServiceState

from . import protocol

log = logging.getLogger("fewstep.grpc")

# InferTensorContents field of each datatype (FP16 and BF16 travel only as raw bytes)
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _contents(tensor, count: int) -> list:
    field = CONTENTS.get(tensor.datatype)
    if field is None:
        raise InvalidRequest(f"input {tensor.name!r}: {tensor.datatype} must be sent raw")
    values = list(getattr(tensor.contents, field))
    if len(values) != count:
        raise InvalidRequest(
            f"input {tensor.name!r} holds {len(values)} elements in contents.{field}; "
            f"its shape needs {count}"
        )
    dtype = oip.NUMPY_TYPES.get(tensor.datatype)
    if dtype is not None and dtype.kind in "iu" and dtype.itemsize < 4:
        info = np.iinfo(dtype)
        if any(not info.min <= v <= info.max for v in values):
            raise InvalidRequest(f"input {tensor.name!r}: a value is out of {tensor.datatype}")
    return values


def _inputs(spec, request) -> dict[str, oip.Tensor]:
    raw = request.raw_input_contents
    if not request.inputs:
        raise InvalidRequest("the request has no inputs")
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input, in order"
        )
    tensors: dict[str, oip.Tensor] = {}
    for i, tensor in enumerate(request.inputs):
        name, shape = tensor.name, list(tensor.shape)
        if name in tensors:
            raise InvalidRequest(f"input {name!r} is given twice")
        count = oip.expect_input(spec, name, tensor.datatype, shape)
        if tensor.parameters:
            raise InvalidRequest(
                f"input {name!r}: parameter(s) {sorted(tensor.parameters)} are not supported"
            )
        if raw:
            if tensor.HasField("contents"):
                raise InvalidRequest(
                    f"input {name!r} has contents while raw_input_contents is used; "
                    "send all inputs one way"
                )
            values = oip.from_raw(name, tensor.datatype, raw[i], count)
        else:
            values = _contents(tensor, count)
        tensors[name] = oip.Tensor(name, tensor.datatype, shape, values)
    return tensors


def _value(name: str, parameter) -> object:
    kind = parameter.WhichOneof("parameter_choice")
    if kind is None:
        raise InvalidRequest(f"parameter {name!r} has no value")
    return getattr(parameter, kind)


def _set(parameter, value: object) -> None:
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = str(value)


def caller(state: ServiceState, context) -> Principal:
    """The principal of a call, from its `authorization` metadata ("Bearer KEY");
    Unauthorized (UNAUTHENTICATED) when a key is needed and this is not one."""
    values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
    return state.keys.authenticate(values[0] if len(values) == 1 else None)


class InferenceServicer:
    """The six RPCs of the protocol, over a ServiceState."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    async def ServerLive(self, request, context):
        return protocol.METHODS["ServerLive"][1](live=True)

    async def ServerReady(self, request, context):
        return protocol.METHODS["ServerReady"][1](ready=self.state.ready)

    async def ModelReady(self, request, context):
        ready = self.state.ready
        if ready:
            try:
                self.state.resolve(request.name, request.version)
            except FewstepError:
                ready = False
        return protocol.METHODS["ModelReady"][1](ready=ready)

    async def ServerMetadata(self, request, context):
        caller(self.state, context)
        return protocol.METHODS["ServerMetadata"][1](**oip.server_metadata())

    async def ModelMetadata(self, request, context):
        caller(self.state, context)
        self.state.require_ready()
        spec = self.state.resolve(request.name, request.version)
        return protocol.ModelMetadataResponse(**oip.model_metadata(self.state, spec))

    async def ModelInfer(self, request, context):
        state = self.state
        principal = caller(state, context)
        if not state.ready:
            raise NotReady("models are still loading; retry shortly", retry_after=2)
        spec = state.resolve(request.model_name, request.model_version)
        tensors = _inputs(spec, request)
        for output in request.outputs:
            if output.parameters:
                raise InvalidRequest(
                    f"output {output.name!r}: parameter(s) {sorted(output.parameters)} "
                    "are not supported"
                )
        names = [output.name for output in request.outputs]
        oip.expect_outputs(spec, names)
        parameters = {k: _value(k, v) for k, v in request.parameters.items()}
        unknown = sorted(set(parameters) - set(oip.SCHEDULE_PARAMETERS))
        if unknown:
            raise InvalidRequest(
                f"unknown request parameter(s) {unknown}; fewstep reads priority, timeout "
                "and quality"
            )
        job, result = await oip.infer(state, spec, tensors, parameters, "v2_grpc", principal)
        response = protocol.ModelInferResponse(
            model_name=spec.name, model_version=str(spec.version), id=request.id
        )
        for key, value in oip.response_parameters(job, result).items():
            _set(response.parameters[key], value)
        for output in oip.outputs(spec, result, names):
            response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
            response.raw_output_contents.append(output.raw)
        return response


def _guarded(method):
    """Turn a FewstepError into the call's status; anything else is a bug, logged."""

    @functools.wraps(method)
    async def call(request, context):
        try:
            return await method(request, context)
        except FewstepError as err:
            trailer = () if err.retry_after is None else err.headers().items()
            await context.abort(
                grpc.StatusCode[err.grpc_code],
                err.message,
                trailing_metadata=tuple((k.lower(), v) for k, v in trailer),
            )

    return call


def handler(state: ServiceState) -> grpc.GenericRpcHandler:
    servicer = InferenceServicer(state)
    methods = {
        name: grpc.unary_unary_rpc_method_handler(
            _guarded(getattr(servicer, name)),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
        for name, (request, response) in protocol.METHODS.items()
    }
    return grpc.method_handlers_generic_handler(protocol.SERVICE, methods)


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    port: int
    health: StateHealth
    watcher: asyncio.Task

    async def drain(self) -> None:
        """Report NOT_SERVING from now on (and never SERVING again), still answering calls."""
        self.watcher.cancel()
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        """Refuse new calls, let those in flight finish for up to `grace` seconds."""
        await self.drain()
        await self.server.stop(grace)


class StateHealth(health_aio.HealthServicer):
    """grpc.health.v1 whose Check for "" and the inference service answers from the
    service's state when asked, as /readyz does (ready, not draining, the worker not
    stopped): a gRPC probe and an HTTP probe never disagree, not even for the moment
    between a change and the stored status's update. Watch streams follow the stored
    statuses (`_serve_when_ready`, `GrpcServer.drain`); other services are the base's."""

    def __init__(self, state: ServiceState) -> None:
        super().__init__()
        self.state, self.shut = state, False

    async def Check(self, request, context):
        if request.service not in ("", protocol.SERVICE):
            return await super().Check(request, context)
        status = health_pb2.HealthCheckResponse
        serving = self.state.serving and not self.shut
        return status(status=status.SERVING if serving else status.NOT_SERVING)

    async def enter_graceful_shutdown(self) -> None:
        self.shut = True
        await super().enter_graceful_shutdown()


async def _serve_when_ready(state: ServiceState, health: health_aio.HealthServicer) -> None:
    while not state.ready:
        await asyncio.sleep(0.05)
    for service in ("", protocol.SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)


async def start(
    state: ServiceState,
    host: str,
    port: int,
    max_message_bytes: int,
    tls: tuple[bytes, bytes] | None = None,
) -> GrpcServer:
    """Serve OIP gRPC and grpc.health.v1 on host:port (0: a free port) in this event loop;
    over TLS with `tls` (PEM certificate chain, PEM private key), else plaintext.

    Health reports NOT_SERVING for "" and the inference service until the models are
    ready, then SERVING, and NOT_SERVING again while draining and from shutdown on
    (`StateHealth`).
    """
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),  # a port already taken is an error, not a shared port
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
    )
    server.add_generic_rpc_handlers((handler(state),))
    health = StateHealth(state)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for service in ("", protocol.SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            chain, key = tls
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([(key, chain)]))
    except RuntimeError as err:
        raise SystemExit(f"fewstep: cannot serve gRPC on {address} ({err})") from None
    await server.start()
    watcher = asyncio.create_task(_serve_when_ready(state, health), name="fewstep-grpc-health")
    log.info("OIP gRPC on %s:%d (%s)", host, bound, "TLS" if tls else "plaintext")
    return GrpcServer(server, bound, health, watcher)
