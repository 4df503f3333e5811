"""The HTTP API against a real server on loopback, with real clients."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json

import httpx
import openai
import pytest
from PIL import Image

from .conftest import serve


def png_size(b64: str) -> tuple[int, int]:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image.size


def test_openai_sdk_generates_pngs(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    response = client.images.generate(
        model="toy",
        prompt="Light",
        n=3,
        size="4x4",
        response_format="b64_json",
        extra_body={"seed": 42},
    )
    assert len(response.data) == 3
    for item in response.data:
        assert png_size(item.b64_json) == (4, 4)
    assert [item.model_extra["seed"] for item in response.data] == [42, 43, 44]
    assert response.data[0].revised_prompt == "light"


def test_light_and_dark_classes_look_different(client):
    def mean_pixel(prompt):
        body = client.post(
            "/v1/images/generations", json={"model": "toy", "prompt": prompt, "seed": 1}
        ).json()
        image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
        return sum(image.getdata()) / 16

    assert mean_pixel("black") < 80 < 170 < mean_pixel("white")


def pixels(item: dict) -> list[int]:
    return list(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).getdata())


def test_same_seed_same_bytes_alone_and_under_concurrent_load(client, server):
    """Repeated alone: identical bytes. Inside batches of other requests: the sampler and
    its noise are batch-invariant, the model's GEMM is not bitwise, so pixels may differ
    by at most one 8-bit level (README, 'Reproducibility')."""
    body = {"model": "toy", "prompt": "dark", "n": 2, "seed": 7, "sampler": "dpmpp_2m", "steps": 6}
    first = client.post("/v1/images/generations", json=body).json()
    again = client.post("/v1/images/generations", json=body).json()
    assert first["data"] == again["data"]

    def one(i):
        other = {
            "model": "toy",
            "prompt": "light",
            "n": 1 + i % 3,
            "seed": 100 + i,
            "steps": 3 + i % 5,
        }
        with httpx.Client(base_url=server.url, timeout=30) as c:
            return c.post("/v1/images/generations", json=body if i % 4 == 0 else other).json()

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(24)))
    for i, result in enumerate(results):
        if i % 4 == 0:
            assert [d["seed"] for d in result["data"]] == [7, 8]
            for got, want in zip(result["data"], first["data"], strict=True):
                assert max(abs(a - b) for a, b in zip(pixels(got), pixels(want), strict=True)) <= 1


def test_thirty_two_concurrent_mixed_requests_share_forward_passes(server):
    samplers = ["euler", "dpmpp_2m", "unipc", "ddpm", "heun", "deis"]

    def one(i):
        body = {
            "model": "toy",
            "prompt": ["dark", "light"][i % 2],
            "sampler": samplers[i % len(samplers)],
            "steps": [2, 3, 4, 8][i % 4],
            "seed": i,
        }
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return c.post("/v1/images/generations", json=body)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(one, range(32)))
    assert [r.status_code for r in responses] == [200] * 32, [
        r.text for r in responses if r.status_code != 200
    ]
    metrics = httpx.get(server.url + "/metrics").text
    single = metric_value(metrics, 'fewstep_batch_requests_bucket{le="1.0",model="toy"}')
    total = metric_value(metrics, 'fewstep_batch_requests_count{model="toy"}')
    assert total > single, "no forward pass held more than one request"


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


def test_job_api_and_server_sent_events(client):
    submitted = client.post(
        "/v1/jobs", json={"model": "toy", "prompt": "dark", "steps": 5, "sampler": "euler"}
    )
    assert submitted.status_code == 202
    job = submitted.json()
    assert submitted.headers["location"] == f"/v1/jobs/{job['id']}"
    events = []
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
            if line.startswith("data: ") and events[-1] == "step":
                data = json.loads(line[6:])
                assert data["steps"] == 5
    assert events[0] == "queued" and events[1] == "started" and events[-1] == "succeeded"
    assert events.count("step") == 5
    status = client.get(f"/v1/jobs/{job['id']}").json()
    assert status["status"] == "succeeded" and status["progress"] == {"step": 5, "steps": 5}
    result = client.get(f"/v1/jobs/{job['id']}/result").json()
    assert result["nfe"] == 5 and png_size(result["data"][0]["b64_json"]) == (4, 4)
    # events replay after the fact, and resume after Last-Event-ID
    replay = client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "6"}).text
    assert replay.count("event: ") == len(events) - 6


def test_step_events_carry_previews_when_asked(client):
    job = client.post(
        "/v1/jobs", json={"model": "toy", "prompt": "dark", "steps": 2, "preview": True}
    ).json()
    text = client.get(f"/v1/jobs/{job['id']}/events").text
    previews = [
        json.loads(line[6:])["preview"] for line in text.splitlines() if '"preview"' in line
    ]
    assert len(previews) == 2 and png_size(previews[0]) == (4, 4)


def test_idempotency_key_returns_the_same_job(client):
    body = {"model": "toy", "prompt": "dark", "seed": 3}
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
    second = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
    assert first.status_code == 202 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    clash = client.post("/v1/jobs", json={**body, "seed": 4}, headers={"Idempotency-Key": "abc-1"})
    assert clash.status_code == 409 and "different request" in clash.json()["error"]["message"]


def test_cancel_a_running_job(client):
    job = client.post(
        "/v1/jobs", json={"model": "slow-model", "prompt": "dark", "steps": 20}
    ).json()
    for _ in range(200):
        if client.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"] >= 2:
            break
    canceled = client.delete(f"/v1/jobs/{job['id']}")
    assert canceled.status_code == 200
    final = client.get(f"/v1/jobs/{job['id']}/result", params={"wait": 5})
    assert final.status_code == 409 and "canceled" in final.json()["error"]["message"]
    status = client.get(f"/v1/jobs/{job['id']}").json()
    assert status["status"] == "canceled" and status["progress"]["step"] < 20


def test_deadline_expires_mid_run_and_before_compute(client):
    late = client.post(
        "/v1/images/generations",
        json={"model": "slow-model", "prompt": "dark", "steps": 20, "deadline_ms": 300},
    )
    assert late.status_code == 408 and "deadline" in late.json()["error"]["message"]
    # a queue of slow jobs ahead: this one cannot start in time. The worker announced its
    # engine speed at start, so admission predicts the wait from the first request on and
    # refuses it at once (before, it was queued and failed when its deadline passed; the
    # worker's side of that is tests/service/test_worker.py)
    ahead = [
        client.post("/v1/jobs", json={"model": "slow-model", "prompt": "dark", "steps": 6})
        for _ in range(3)
    ]
    refused = client.post(
        "/v1/jobs", json={"model": "slow-model", "prompt": "dark", "steps": 2, "deadline_ms": 1}
    )
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "deadline_unmeetable"
    for a in ahead:
        assert (
            client.get(f"/v1/jobs/{a.json()['id']}/result", params={"wait": 10}).status_code == 200
        )


def test_a_non_finite_request_fails_alone(server):
    def one(prompt):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            return c.post(
                "/v1/images/generations", json={"model": "nan-model", "prompt": prompt, "steps": 4}
            )

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(one, ["dark", "light", "dark", "light", "dark", "dark"]))
    codes = [r.status_code for r in responses]
    assert codes == [200, 422, 200, 422, 200, 200]
    assert "non-finite" in responses[1].json()["error"]["message"]


def test_an_engine_crash_fails_only_the_culprit(server):
    def one(prompt):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            return c.post(
                "/v1/images/generations",
                json={"model": "crash-model", "prompt": prompt, "steps": 3},
            )

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(one, ["dark", "light", "dark", "dark"]))
    assert [r.status_code for r in responses] == [200, 422, 200, 200]
    assert "kernel failure" in responses[1].json()["error"]["message"]


BAD_REQUESTS = [
    ({"model": "nope", "prompt": "dark"}, 404, "unknown model 'nope'"),
    ({"model": "toy@7", "prompt": "dark"}, 404, "has no version '7'"),
    ({"prompt": "dark"}, 400, "model is required"),
    ({"model": "toy", "prompt": "teal"}, 400, "use one of ['dark', 'light']"),
    ({"model": "toy", "prompt": "dark", "sampler": "lcm"}, 400, "sampler 'lcm' is not available"),
    (
        {"model": "toy", "prompt": "dark", "steps": 21},
        400,
        "steps must be in 2..20 for sampler dpmpp_2m",
    ),
    (
        {"model": "toy", "prompt": "dark", "steps": 0},
        400,
        "steps: Input should be greater than or equal to 1",
    ),
    (
        {"model": "toy", "prompt": "dark", "sampler": "dpmpp_3m", "steps": 2},
        400,
        "steps must be in 3..20",
    ),
    ({"model": "toy", "prompt": "dark", "n": 9}, 400, "n must be at most 8"),
    (
        {"model": "toy", "prompt": "dark", "seed": -1},
        400,
        "seed: Input should be greater than or equal to 0",
    ),
    (
        {"model": "toy", "prompt": "dark", "seed": 2**63},
        400,
        "seed: Input should be less than or equal to",
    ),
    (
        {"model": "toy", "prompt": "dark", "seed": "abc"},
        400,
        "seed: Input should be a valid integer",
    ),
    ({"model": "toy", "prompt": "dark", "size": "64x64"}, 400, "send size '4x4'"),
    ({"model": "toy", "prompt": "dark", "response_format": "url"}, 400, "use 'b64_json'"),
    ({"model": "toy", "prompt": "dark", "guidance_scale": 3}, 400, "no classifier-free guidance"),
    ({"model": "tiny-model", "prompt": "dark", "teleport": True}, 400, "teleport is not available"),
    ({"model": "toy", "prompt": "dark", "temperature": 1}, 400, "unknown field 'temperature'"),
    ({"model": "toy", "prompt": "dark", "deadline_ms": 0}, 400, "deadline_ms"),
    ({"model": "toy", "prompt": "dark", "priority": 99}, 400, "priority"),
]


@pytest.mark.parametrize("endpoint", ["/v1/images/generations", "/v1/jobs"])
@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_a_clear_4xx(client, endpoint, body, status, message):
    response = client.post(endpoint, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"]


def test_malformed_and_oversized_bodies(client):
    bad_json = client.post(
        "/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    huge = client.post("/v1/images/generations", json={"model": "toy", "prompt": "x" * 70000})
    assert huge.status_code == 413 and "smaller request" in huge.json()["error"]["message"]

    def chunks():
        yield b'{"model": "toy", "prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    streamed = client.post(
        "/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413


def test_unknown_jobs_and_routes(client):
    assert client.get("/v1/jobs/job_missing").status_code == 404
    assert client.delete("/v1/jobs/job_missing").status_code == 404
    assert client.get("/v1/jobs/job_missing/events").status_code == 404
    assert client.get("/v1/nothing").json()["error"]["message"] == "Not Found"
    assert client.get("/v1/jobs/job_missing/result", params={"wait": 100}).status_code in (400, 404)


def test_models_health_and_metrics(client):
    models = client.get("/v1/models").json()["data"]
    toy = next(m for m in models if m["id"] == "toy")
    assert (
        toy["samplers"][0] == "euler"
        and toy["limits"]["max_n"] == 8
        and toy["labels"] == ["dark", "light"]
    )
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    client.post("/v1/images/generations", json={"model": "toy", "prompt": "dark"})
    text = client.get("/metrics").text
    names = (
        "requests_total request_duration_seconds queue_wait_seconds compute_seconds batch_samples "
        "forward_seconds nfe_total active_jobs queue_depth queue_lag rejected_total "
        "model_load_seconds model_ready"
    )
    for name in names.split():
        assert f"fewstep_{name}" in text


def test_admission_control_answers_429_with_retry_after():
    with serve(max_queued_samples=4) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        codes, retry = [], None
        for _ in range(10):
            r = c.post(
                "/v1/jobs", json={"model": "slow-model", "prompt": "dark", "n": 2, "steps": 20}
            )
            codes.append(r.status_code)
            if r.status_code == 429:
                retry = r.headers["retry-after"]
                assert "queue holds" in r.json()["error"]["message"]
        assert 429 in codes and 202 in codes and int(retry) >= 1
        rejected = 'fewstep_rejected_total{principal="anonymous",reason="queue_full"}'
        assert rejected in c.get("/metrics").text


def test_static_batching_mode_serves_the_same_results():
    body = {"model": "toy", "prompt": "light", "n": 2, "seed": 11, "steps": 5}
    with (
        serve(batching="static", max_queue_delay_ms=2) as server,
        httpx.Client(base_url=server.url) as c,
    ):
        static = c.post("/v1/images/generations", json=body).json()["data"]
    with serve() as server, httpx.Client(base_url=server.url) as c:
        continuous = c.post("/v1/images/generations", json=body).json()["data"]
    assert static == continuous
