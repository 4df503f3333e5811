"""The Open Inference Protocol over HTTP, with tritonclient (a client no one here wrote)
against a real server on loopback, plus raw requests where the protocol's bytes matter."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from engines.gaussian import GaussianStats
from engines.repository import LoadedModel
from service import oip
from service.app import create_app
from service.config import Settings

from .conftest import fixture_models, serve, toy_spec, toy_stats
from .redisutil import REDIS_URL, delete_prefix, new_prefix, require_redis
from .test_distributed import fixture_api, fixture_worker


def plain_model() -> LoadedModel:
    """An unconditional fixture model: one Gaussian, no labels (its batch size is `n`)."""
    stats = toy_stats()
    plain = GaussianStats(stats.mean[:1], stats.eigvals[:1], stats.eigvecs[:1], stats.shape)
    spec = toy_spec("plain", labels=(), synonyms={})
    return LoadedModel(spec, plain.denoiser(), plain, "sha256:plain")


@pytest.fixture(scope="module")
def server():
    models = {**fixture_models(), ("plain", 1): plain_model()}
    with serve(models, grpc=True, grpc_port=0, host="127.0.0.1") as s:
        yield s


@pytest.fixture
def triton(server):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}", concurrency=4)
    yield client
    client.close()


def tensor(name: str, values, datatype: str, binary: bool = True, module=httpclient):
    array = np.array(values, dtype=object if datatype == "BYTES" else None)
    if datatype != "BYTES":
        array = array.astype({"INT64": np.int64, "INT32": np.int32, "BOOL": bool}[datatype])
    t = module.InferInput(name, list(array.shape), datatype)
    if module is httpclient:
        t.set_data_from_numpy(array, binary_data=binary)
    else:
        t.set_data_from_numpy(array)
    return t


def toy_inputs(labels, seed, steps=5, sampler="unipc", binary=True, module=httpclient):
    return [
        tensor("label", [s.encode() for s in labels], "BYTES", binary, module),
        tensor("seed", [seed], "INT64", binary, module),
        tensor("steps", [steps], "INT32", binary, module),
        tensor("sampler", [sampler.encode()], "BYTES", binary, module),
    ]


def png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


# -- health and metadata ---------------------------------------------------------------


def test_health_and_server_metadata(server, triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.get_server_metadata() == {
        "name": "fewstep",
        "version": oip.server_version(),
        "extensions": ["binary_tensor_data", "parameters", "schedule_policy"],
    }
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/toy/versions/1/ready"):
        r = httpx.get(server.url + path)
        assert (r.status_code, r.content) == (200, b"")


def test_model_metadata_lists_the_real_inputs_and_outputs(triton):
    meta = triton.get_model_metadata("toy")
    assert meta == triton.get_model_metadata("toy", "1")
    assert (meta["name"], meta["versions"], meta["platform"]) == ("toy", ["1"], "fewstep_gaussian")
    assert meta["inputs"] == [
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "seed", "datatype": "INT64", "shape": [1]},
        {"name": "steps", "datatype": "INT32", "shape": [1]},
        {"name": "sampler", "datatype": "BYTES", "shape": [1]},
        {"name": "grid", "datatype": "BYTES", "shape": [1]},
        {"name": "teleport", "datatype": "BOOL", "shape": [1]},
    ]
    assert meta["outputs"] == [
        {"name": "image", "datatype": "UINT8", "shape": [-1, 4, 4, 1]},
        {"name": "seed", "datatype": "INT64", "shape": [-1]},
    ]
    # no Gaussian statistics: no teleport input; no labels: n instead of label
    tiny = [t["name"] for t in triton.get_model_metadata("tiny-model")["inputs"]]
    assert tiny == ["label", "seed", "steps", "sampler", "grid"]
    plain = triton.get_model_metadata("plain")["inputs"][0]
    assert plain == {"name": "n", "datatype": "INT32", "shape": [1]}


def test_model_readiness_and_unknown_models(server, triton):
    assert triton.is_model_ready("toy") and triton.is_model_ready("toy", "1")
    assert not triton.is_model_ready("nope") and not triton.is_model_ready("toy", "2")
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as err:
        triton.get_model_metadata("nope")
    assert err.value.status() == "404"
    r = httpx.get(server.url + "/v2/models/toy/versions/x")
    assert r.status_code == 404 and r.json() == {
        "error": "model 'toy' has no version 'x'; versions: ['1']"
    }


def test_not_ready_server_says_so_in_the_protocol():
    """Before the lifespan has loaded the models: ready is a 4xx, infer a 503."""

    async def main():
        app = create_app(Settings(warmup=False, grpc=False), loaded=fixture_models())
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fewstep") as c:
            assert (await c.get("/v2/health/live")).status_code == 200
            assert (await c.get("/v2/health/ready")).status_code == 400
            assert (await c.get("/v2/models/toy/ready")).status_code == 400
            r = await c.post("/v2/models/toy/infer", json={"inputs": []})
            assert r.status_code == 503 and "still loading" in r.json()["error"]

    asyncio.run(main())


# -- inference ---------------------------------------------------------------------------


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_infer_with_binary_data_on_and_off(triton, binary_in, binary_out):
    outputs = [
        httpclient.InferRequestedOutput("image", binary_data=binary_out),
        httpclient.InferRequestedOutput("seed", binary_data=binary_out),
    ]
    result = triton.infer(
        "toy", toy_inputs(["dark", "white"], 21, binary=binary_in), outputs=outputs
    )
    image = result.as_numpy("image")
    assert image.dtype == np.uint8 and image.shape == (2, 4, 4, 1)
    assert result.as_numpy("seed").tolist() == [21, 22]
    assert image[0].mean() < 80 < 170 < image[1].mean()  # per-image labels: dark, then light
    for output in result.get_response()["outputs"]:
        assert ("binary_data_size" in output.get("parameters", {})) is binary_out
        assert ("data" in output) is not binary_out
    params = result.get_response()["parameters"]
    assert (params["sampler"], params["steps"], params["nfe"]) == ("unipc", 5, 5)
    reference = triton.infer("toy", toy_inputs(["dark", "white"], 21))
    np.testing.assert_array_equal(image, reference.as_numpy("image"))


def test_results_equal_the_openai_endpoint_for_the_same_seed(server, triton):
    """Same model, seed, sampler and steps: the same pixels from PNGs, OIP HTTP and gRPC."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    response = client.images.generate(
        model="toy",
        prompt="light",
        n=3,
        response_format="b64_json",
        extra_body={"seed": 11, "steps": 5, "sampler": "unipc"},
    )
    pngs = np.stack([png_pixels(item.b64_json) for item in response.data])[..., None]
    http = triton.infer("toy", toy_inputs(["light"] * 3, 11))
    np.testing.assert_array_equal(http.as_numpy("image"), pngs)
    assert http.as_numpy("seed").tolist() == [item.model_extra["seed"] for item in response.data]
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.app.state.grpc_port}")
    over_grpc = grpc.infer("toy", toy_inputs(["light"] * 3, 11, module=grpcclient))
    np.testing.assert_array_equal(over_grpc.as_numpy("image"), pngs)
    grpc.close()


def test_unconditional_model_takes_n(triton):
    result = triton.infer("plain", [tensor("n", [3], "INT32"), tensor("seed", [5], "INT64")])
    assert result.as_numpy("image").shape == (3, 4, 4, 1)
    assert result.as_numpy("seed").tolist() == [5, 6, 7]


def test_defaults_teleport_and_request_id(triton):
    result = triton.infer(
        "toy",
        [tensor("label", [b"black"], "BYTES"), tensor("teleport", [True], "BOOL")],
        request_id="r-42",
        outputs=[httpclient.InferRequestedOutput("seed")],
    )
    response = result.get_response()
    assert response["id"] == "r-42" and response["model_version"] == "1"
    assert [o["name"] for o in response["outputs"]] == ["seed"]  # only what was asked
    assert response["parameters"]["steps"] == 4  # the model's default
    assert result.as_numpy("image") is None


def test_async_infer_from_gevent_and_asyncio_clients(server, triton):
    """Concurrent requests share forward passes and each still gets its own images: the
    same as alone, up to one 8-bit level (README, 'Reproducibility')."""
    alone = {
        seed: triton.infer("toy", toy_inputs(["dark"], seed)).as_numpy("image")
        for seed in range(30, 38)
    }
    pending = {seed: triton.async_infer("toy", toy_inputs(["dark"], seed)) for seed in alone}
    for seed, request in pending.items():
        got = request.get_result().as_numpy("image").astype(int)
        assert np.abs(got - alone[seed]).max() <= 1

    async def main():
        client = aiohttpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            return await asyncio.gather(
                *(client.infer("toy", toy_inputs(["dark"], seed)) for seed in alone)
            )
        finally:
            await client.close()

    for seed, result in zip(alone, asyncio.run(main()), strict=True):
        assert np.abs(result.as_numpy("image").astype(int) - alone[seed]).max() <= 1


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request_bodies(triton, algorithm):
    result = triton.infer("toy", toy_inputs(["dark"], 3), request_compression_algorithm=algorithm)
    np.testing.assert_array_equal(
        result.as_numpy("image"), triton.infer("toy", toy_inputs(["dark"], 3)).as_numpy("image")
    )


def test_schedule_policy_parameters(triton):
    assert oip.schedule({}) == (0, None)
    assert oip.schedule({"priority": 1, "timeout": 1500}) == (10, 2)
    assert oip.schedule({"priority": 21}) == (-10, None)
    result = triton.infer("toy", toy_inputs(["dark"], 1), priority=1, timeout=10_000_000)
    assert result.as_numpy("image").shape == (1, 4, 4, 1)
    # 20 steps of 50 ms cannot finish in 30 ms: the deadline stops it
    with pytest.raises(InferenceServerException, match="raise the 'timeout' parameter") as err:
        triton.infer("slow-model", toy_inputs(["dark"], 1, steps=20), timeout=30_000)
    assert err.value.status() == "408"


# -- bad inputs ----------------------------------------------------------------------------


def body(*inputs, **fields) -> dict:
    return {"inputs": list(inputs), **fields}


def label(data=("dark",), shape=None, datatype="BYTES") -> dict:
    return {"name": "label", "datatype": datatype, "shape": shape or [len(data)], "data": data}


def scalar(name: str, value, datatype: str) -> dict:
    return {"name": name, "datatype": datatype, "shape": [1], "data": [value]}


BAD_REQUESTS = [
    (
        "wrong datatype",
        body(label(), scalar("seed", 1, "INT32")),
        400,
        "input 'seed' has datatype INT32; model toy expects INT64",
    ),
    (
        "unknown datatype",
        body(label(), scalar("seed", 1, "INT128")),
        400,
        "unknown datatype 'INT128'",
    ),
    (
        "missing input",
        body(scalar("seed", 1, "INT64")),
        400,
        "input 'label' (BYTES, shape [-1]) is missing; model toy needs it",
    ),
    ("no inputs", body(), 400, "'inputs' must be a non-empty list"),
    (
        "unknown input",
        body(label(), scalar("prompt", "x", "BYTES")),
        400,
        "unexpected input 'prompt' for model toy; its inputs are ['label', 'seed'",
    ),
    ("input twice", body(label(), label()), 400, "input 'label' is given twice"),
    (
        "wrong shape",
        body(label(), {**scalar("seed", 1, "INT64"), "shape": [2]}),
        400,
        "input 'seed' has shape [2]; model toy expects [1]",
    ),
    ("shape not ints", body(label(shape=["1"])), 400, "shape must be a list of non-negative"),
    ("count mismatch", body(label(shape=[2])), 400, "input 'label' holds 1 elements; its shape"),
    (
        "not a class",
        body(label(["dark", "car"])),
        400,
        "input 'label' element 1: 'car' is not a class of model toy; use one of ['dark', 'light']",
    ),
    ("empty label", body(label([], shape=[0])), 400, "input 'label' is empty"),
    (
        "too many images",
        body(label(["dark"] * 9)),
        400,
        "asks for 9 images; model toy makes at most 8 per request",
    ),
    ("BYTES not text", body(label([3])), 400, "input 'label': 3 is not a BYTES value"),
    (
        "INT64 out of range",
        body(label(), scalar("seed", 2**64, "INT64")),
        400,
        "is not a INT64 value",
    ),
    (
        "negative seed",
        body(label(), scalar("seed", -1, "INT64")),
        400,
        "input 'seed': Input should be greater than or equal to 0",
    ),
    ("steps zero", body(label(), scalar("steps", 0, "INT32")), 400, "input 'steps'"),
    (
        "steps too many",
        body(label(), scalar("steps", 500, "INT32")),
        400,
        "steps must be in 2..20 for sampler dpmpp_2m on model toy, got 500",
    ),
    (
        "unknown sampler",
        body(label(), scalar("sampler", "warp", "BYTES")),
        400,
        "sampler 'warp' is not available for model toy",
    ),
    ("nested too deep", body(label([["dark"]], shape=[1])), 400, "nested deeper than its shape"),
    (
        "priority text",
        body(label(), parameters={"priority": "high"}),
        400,
        "parameter 'priority' must be an integer level in 1..21",
    ),
    ("priority level", body(label(), parameters={"priority": 22}), 400, "parameter 'priority'"),
    (
        "negative timeout",
        body(label(), parameters={"timeout": -5}),
        400,
        "parameter 'timeout' must be a non-negative integer of microseconds",
    ),
    ("huge timeout", body(label(), parameters={"timeout": 10**14}), 400, "parameter 'timeout'"),
    (
        "unknown parameter",
        body(label(), parameters={"sequence_id": 3}),
        400,
        "unknown request parameter(s) ['sequence_id']",
    ),
    ("parameters not object", body(label(), parameters=[1]), 400, "parameters must be a JSON"),
    (
        "unknown output",
        body(label(), outputs=[{"name": "latent"}]),
        400,
        "unexpected output 'latent' for model toy; its outputs are ['image', 'seed']",
    ),
    (
        "output param",
        body(label(), outputs=[{"name": "image", "parameters": {"classification": 2}}]),
        400,
        "parameter(s) ['classification'] are not supported",
    ),
    ("unknown field", body(label(), stream=True), 400, "unknown request field(s) ['stream']"),
    ("id not text", body(label(), id=7), 400, "'id' must be a string"),
]


@pytest.mark.parametrize(
    ("request_body", "status", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_get_the_protocols_error(server, request_body, status, message):
    r = httpx.post(server.url + "/v2/models/toy/infer", json=request_body)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and isinstance(r.json()["error"], str)
    assert message in r.json()["error"]


def binary_body(seed_size: int, seed_bytes: bytes, extra: bytes = b"") -> tuple[bytes, dict]:
    """A binary-extension request whose seed claims `seed_size` bytes."""
    seed = {"name": "seed", "datatype": "INT64", "shape": [1]}
    seed["parameters"] = {"binary_data_size": seed_size}
    header = json.dumps(body(label(), seed)).encode()
    return header + seed_bytes + extra, {"Inference-Header-Content-Length": str(len(header))}


def raw(content: bytes, headers: dict | None = None):
    return lambda: (content, headers or {})


RAW_BAD = [
    ("not JSON", raw(b"{inputs"), "the request's JSON header is not valid JSON"),
    ("deeply nested", raw(b"[" * 50_000), "not valid JSON"),
    ("not an object", raw(b"[1]"), "must be a JSON object"),
    (
        "header longer than body",
        raw(b"{}", {"Inference-Header-Content-Length": "9"}),
        "Inference-Header-Content-Length must be the byte length of the JSON header",
    ),
    (
        "binary past the end",
        lambda: binary_body(99, b"\0" * 8),
        "binary_data_size 99 runs past the 8 bytes",
    ),
    (
        "bytes nobody claims",
        lambda: binary_body(8, b"\0" * 8, b"\0" * 4),
        "4 bytes of binary data after the inputs belong to no input",
    ),
    (
        "raw size mismatch",
        lambda: binary_body(4, b"\0" * 4),
        "input 'seed' has 4 bytes of data; 1 INT64 elements take 8",
    ),
    ("bad gzip", raw(b"not gzip", {"Content-Encoding": "gzip"}), "not valid gzip data"),
    ("unknown encoding", raw(b"{}", {"Content-Encoding": "br"}), "Content-Encoding 'br'"),
]


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in RAW_BAD], ids=[c[0] for c in RAW_BAD])
def test_malformed_bodies_get_the_protocols_error(server, make, message):
    content, headers = make()
    r = httpx.post(server.url + "/v2/models/toy/infer", content=content, headers=headers)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_server_keeps_working_after_bad_requests(server, triton):
    with pytest.raises(InferenceServerException, match="expects INT64"):
        triton.infer("toy", [tensor("label", [b"dark"], "BYTES"), tensor("seed", [1], "INT32")])
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        triton.infer("nope", toy_inputs(["dark"], 1))
    with pytest.raises(InferenceServerException, match=r"'label' .* is missing"):
        triton.infer("toy", [tensor("seed", [1], "INT64")])
    # a failing model fails the request alone, with the protocol's error
    with pytest.raises(InferenceServerException, match="non-finite") as err:
        triton.infer("nan-model", toy_inputs(["light"], 1, sampler="euler"))
    assert err.value.status() == "422"
    too_big = httpx.post(server.url + "/v2/models/toy/infer", content=b"x" * 70_000)
    assert too_big.status_code == 413 and "over 65536 bytes" in too_big.json()["error"]
    missing = httpx.get(server.url + "/v2/models/toy/stats")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    assert triton.infer("toy", toy_inputs(["dark"], 1)).as_numpy("image").shape == (1, 4, 4, 1)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'endpoint="v2_http",model="toy"' in metrics


def test_tiny_model_limits_come_from_its_spec(triton):
    with pytest.raises(InferenceServerException, match="makes at most 2 per request"):
        triton.infer("tiny-model", [tensor("label", [b"dark"] * 3, "BYTES")])


def test_over_the_redis_queue_results_equal_the_embedded_servers(triton, tmp_path):
    """OIP on an API process without a worker, a worker process and Redis between them:
    raw-pixel jobs cross the queue, and the pixels are the embedded server's."""
    require_redis()
    prefix = new_prefix()
    env = {"FEWSTEP_QUEUE": REDIS_URL, "FEWSTEP_REDIS_PREFIX": prefix}
    worker = fixture_worker(env, tmp_path / "worker.log")
    api = None
    try:
        api, url = fixture_api(env, tmp_path / "api.log")
        remote = httpclient.InferenceServerClient(url.removeprefix("http://"))
        got = remote.infer("toy", toy_inputs(["dark", "light"], 77))
        want = triton.infer("toy", toy_inputs(["dark", "light"], 77))
        np.testing.assert_array_equal(got.as_numpy("image"), want.as_numpy("image"))
        assert got.as_numpy("seed").tolist() == [77, 78]
        remote.close()
    finally:
        worker.signal(signal.SIGTERM)
        worker.wait(30)
        if api is not None:
            api.kill()
        delete_prefix(prefix)
