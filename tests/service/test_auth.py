"""API keys, tenancy and quotas through the real clients (openai SDK, tritonclient HTTP and
gRPC) against a real server on loopback; and one quota shared by two API processes over
the real Redis."""

from __future__ import annotations

import logging
import time

import grpc
import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from tritonclient.utils import InferenceServerException

from service.app import loopback
from service.security import hash_key

from .conftest import serve
from .redisutil import REDIS_URL, api_process, delete_prefix, new_prefix, require_redis

PLAIN = "plain-key-0123456789"
KEYS = {name: f"{name}-secret-key-42" for name in ("alice", "bob", "carol", "dave")}
LIMITS = {
    "alice": {"priorities": [-10, 0]},
    "bob": {},
    "carol": {"requests_per_second": 0.5, "burst": 2},
    "dave": {"max_samples_in_flight": 2},
}


def key_file(folder, limits=LIMITS) -> str:
    entries = [{"name": n, "sha256": hash_key(KEYS[n]), **lim} for n, lim in limits.items()]
    path = folder / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": entries}))
    return str(path)


def auth(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    keys = key_file(tmp_path_factory.mktemp("keys"))
    with serve(api_key=[PLAIN], api_key_file=keys, grpc=True, grpc_port=0, host="127.0.0.1") as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


IMAGE = {"model": "toy", "prompt": "dark", "steps": 2, "seed": 1}


def test_openai_sdk_without_a_key_gets_401_and_with_one_images(server):
    for key in ("wrong-key-0000000", "x"):
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            sdk.images.generate(model="toy", prompt="dark")
        assert err.value.status_code == 401
        assert "API key is not valid" in err.value.message
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=PLAIN, max_retries=0)
    result = sdk.images.generate(model="toy", prompt="dark", n=2, response_format="b64_json")
    assert len(result.data) == 2
    bare = httpx.post(server.url + "/v1/images/generations", json=IMAGE)
    assert bare.status_code == 401 and bare.headers["www-authenticate"] == "Bearer"
    assert bare.json()["error"]["code"] == "invalid_api_key"
    assert "Authorization: Bearer" in bare.json()["error"]["message"]


def test_health_and_metrics_stay_open_everything_else_needs_a_key(client):
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"):
        assert client.get(path).status_code == 200, path
    for path in ("/v1/models", "/v1/models/toy", "/v2", "/v2/models/toy", "/v1/jobs/job_x"):
        r = client.get(path)
        assert r.status_code == 401, path
        body = r.json()
        assert isinstance(body["error"], str if path.startswith("/v2") else dict), path
    assert client.get("/v1/models", headers=auth("bob")).status_code == 200


def test_tritonclient_http_sends_the_key_as_a_header(server):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        assert client.is_server_live() and client.is_model_ready("toy")
        inputs = [httpclient.InferInput("label", [1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([b"dark"], dtype=object))
        with pytest.raises(InferenceServerException) as err:
            client.infer("toy", inputs)
        assert err.value.status() == "401" and "API key" in err.value.message()
        result = client.infer("toy", inputs, headers=auth("bob"))
        assert result.as_numpy("image").shape == (1, 4, 4, 1)
    finally:
        client.close()


def test_tritonclient_grpc_sends_the_key_as_metadata(server):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.app.state.grpc_port}")
    try:
        assert client.is_server_live() and client.is_model_ready("toy")
        inputs = [grpcclient.InferInput("label", [1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([b"dark"], dtype=object))
        with pytest.raises(InferenceServerException) as err:
            client.infer("toy", inputs)
        assert err.value.status() == str(grpc.StatusCode.UNAUTHENTICATED)
        with pytest.raises(InferenceServerException) as err:
            client.get_model_metadata("toy", headers={"authorization": "Bearer nope-nope-nope"})
        assert err.value.status() == str(grpc.StatusCode.UNAUTHENTICATED)
        result = client.infer("toy", inputs, headers={"authorization": f"Bearer {PLAIN}"})
        assert result.as_numpy("image").shape == (1, 4, 4, 1)
    finally:
        client.close()


def test_another_principals_job_is_as_unknown_as_no_job(client):
    job = client.post("/v1/jobs", json=IMAGE, headers=auth("alice")).json()
    path = f"/v1/jobs/{job['id']}"
    unknown = client.get("/v1/jobs/job_000000000000000000000000", headers=auth("bob"))
    assert unknown.status_code == 404
    for method, suffix in (("GET", ""), ("GET", "/result"), ("GET", "/events"), ("DELETE", "")):
        r = client.request(method, path + suffix, headers=auth("bob"))
        assert r.status_code == 404, (method, suffix)
        assert r.json()["error"]["message"] == (
            f"no job {job['id']!r}; it never existed or has been forgotten"
        )
        assert client.request(method, path + suffix, headers={}).status_code == 401
    done = client.get(path + "/result", params={"wait": 10}, headers=auth("alice"))
    assert done.status_code == 200 and len(done.json()["data"]) == 1
    assert client.get(path, headers=auth("alice")).json()["status"] == "succeeded"


def test_idempotency_keys_are_per_principal(client):
    key = {"Idempotency-Key": "same-key-for-everyone"}
    first = client.post("/v1/jobs", json=IMAGE, headers={**auth("alice"), **key})
    again = client.post("/v1/jobs", json=IMAGE, headers={**auth("alice"), **key})
    other = client.post("/v1/jobs", json=IMAGE, headers={**auth("bob"), **key})
    assert (first.status_code, again.status_code, other.status_code) == (202, 200, 202)
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]


def test_priorities_are_part_of_a_principals_limits(client):
    refused = client.post("/v1/jobs", json={**IMAGE, "priority": 5}, headers=auth("alice"))
    assert refused.status_code == 403
    assert "send a priority in -10..0" in refused.json()["error"]["message"]
    assert client.post("/v1/jobs", json={**IMAGE, "priority": 5}, headers=auth("bob")).is_success


def test_request_rate_quota_is_a_429_with_openai_headers(client):
    codes = [
        client.post("/v1/images/generations", json=IMAGE, headers=auth("carol")).status_code
        for _ in range(3)
    ]
    assert codes == [200, 200, 429]
    refused = client.post("/v1/images/generations", json=IMAGE, headers=auth("carol"))
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    headers = refused.headers
    assert 1 <= int(headers["retry-after"]) <= 2
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    # another principal is not affected
    assert client.post("/v1/images/generations", json=IMAGE, headers=auth("bob")).is_success
    # the metrics say who: requests and refusals carry the API key's name
    metrics = client.get("/metrics").text
    assert 'fewstep_rejected_total{principal="carol",reason="rate_limited"}' in metrics
    assert 'fewstep_rejected_total{principal="bob",reason="rate_limited"}' not in metrics
    for name in ("carol", "bob"):
        assert f'principal="{name}",sampler="dpmpp_2m",status="200"}}' in metrics
    sdk = openai.OpenAI(
        base_url=str(client.base_url).rstrip("/") + "/v1", api_key=KEYS["carol"], max_retries=0
    )
    with pytest.raises(openai.RateLimitError):
        sdk.images.generate(model="toy", prompt="dark")


def test_samples_in_flight_are_held_until_the_job_ends(client):
    slow = {"model": "slow-model", "prompt": "dark", "n": 2, "steps": 10}
    job = client.post("/v1/jobs", json=slow, headers=auth("dave"))
    assert job.status_code == 202
    refused = client.post("/v1/jobs", json={**IMAGE, "n": 1}, headers=auth("dave"))
    assert refused.status_code == 429
    assert refused.headers["x-ratelimit-limit-samples"] == "2"
    assert refused.headers["x-ratelimit-remaining-samples"] == "0"
    path = f"/v1/jobs/{job.json()['id']}/result"
    assert client.get(path, params={"wait": 20}, headers=auth("dave")).status_code == 200
    deadline = time.monotonic() + 5  # the release follows the result within moments
    while time.monotonic() < deadline:
        r = client.post("/v1/images/generations", json={**IMAGE, "n": 2}, headers=auth("dave"))
        if r.status_code != 429:
            break
        time.sleep(0.05)
    assert r.status_code == 200
    # synchronous requests give their samples back once answered
    for _ in range(3):
        r = client.post("/v1/images/generations", json={**IMAGE, "n": 2}, headers=auth("dave"))
        assert r.status_code == 200


def test_no_key_on_a_public_address_is_logged(caplog):
    assert loopback("127.0.0.1") and loopback("::1") and loopback("localhost")
    assert not loopback("0.0.0.0") and not loopback("10.0.0.1")
    with caplog.at_level(logging.WARNING, logger="fewstep"), serve(host="0.0.0.0"):
        pass
    assert any("no API key is configured" in r.getMessage() for r in caplog.records)


def test_two_api_processes_share_one_quota_in_redis(tmp_path):
    """Per-process buckets would let 2 + 2 requests through; one shared bucket, 2."""
    require_redis()
    prefix = new_prefix()
    keys = key_file(tmp_path, {n: LIMITS[n] for n in ("carol", "dave")})
    procs = []
    try:
        for name in ("a", "b"):
            procs.append(
                api_process(REDIS_URL, prefix, tmp_path / f"{name}.log", "--api-key-file", keys)
            )
        (_, a), (_, b) = procs
        body = {"model": "fashion-cd", "prompt": "bag", "steps": 1}
        codes = [
            httpx.post(url + "/v1/jobs", json=body, headers=auth("carol"), timeout=10).status_code
            for url in (a, b, a)
        ]
        assert codes == [202, 202, 429]
        held = httpx.post(a + "/v1/jobs", json={**body, "n": 2}, headers=auth("dave"), timeout=10)
        assert held.status_code == 202  # no worker: its 2 samples stay in flight
        more = httpx.post(b + "/v1/jobs", json=body, headers=auth("dave"), timeout=10)
        assert more.status_code == 429 and more.headers["x-ratelimit-limit-samples"] == "2"
    finally:
        for proc, _ in procs:
            proc.kill()
        delete_prefix(prefix)


def test_metrics_ask_for_a_key_when_metrics_auth_is_set():
    with serve(api_key=[PLAIN], metrics_auth=True) as s:
        assert httpx.get(s.url + "/metrics").status_code == 401
        ok = httpx.get(s.url + "/metrics", headers={"Authorization": f"Bearer {PLAIN}"})
        assert ok.status_code == 200 and "fewstep_requests_total" in ok.text
        assert httpx.get(s.url + "/healthz").status_code == 200
        schema = httpx.get(s.url + "/openapi.json").json()
        assert schema["paths"]["/metrics"]["get"]["security"] == [{"HTTPBearer": []}]
