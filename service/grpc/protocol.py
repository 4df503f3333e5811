"""Message classes of inference.GRPCInferenceService, from a private descriptor pool.

The descriptor set is generated from grpc_predict_v2.proto (the command is in that file).
A private pool, not protobuf's default one, because tritonclient's stubs register the same
`inference.*` names in the default pool and a second registration would fail at import:
with its own pool the server runs in any process, a client's included.
"""

from __future__ import annotations

from importlib import resources

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "inference.GRPCInferenceService"
DESCRIPTOR_SET = "grpc_predict_v2.binpb"


def _load_pool() -> descriptor_pool.DescriptorPool:
    data = resources.files(__package__).joinpath(DESCRIPTOR_SET).read_bytes()
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        pool.Add(file)
    return pool


POOL = _load_pool()


def message(name: str) -> type:
    """The generated message class of `inference.<name>`."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"inference.{name}"))


# rpc name -> (request class, response class), from the service descriptor itself
METHODS: dict[str, tuple[type, type]] = {
    method.name: (
        message_factory.GetMessageClass(method.input_type),
        message_factory.GetMessageClass(method.output_type),
    )
    for method in POOL.FindServiceByName(SERVICE).methods
}

ModelInferRequest = message("ModelInferRequest")
ModelInferResponse = message("ModelInferResponse")
ModelMetadataResponse = message("ModelMetadataResponse")
InferParameter = message("InferParameter")
