"""best_of and steering through the real app on loopback: responses, reproducibility,
the 400s, and the k-fold cost that admission, the queue and the quotas see."""

from __future__ import annotations

import base64
from dataclasses import replace

import httpx
import openai
import pytest

from engines.verifiers import VerifierConfig
from service import admission
from service.admission import Request
from service.security import hash_key

from .conftest import elementwise, fixture_models, serve, toy_model


class LightVerifier:
    """Fixture verifier: the lighter the sample, the better."""

    name = "fixture:light"
    needs_labels = False

    def score(self, x0, labels):
        return x0.double().flatten(1).mean(1)


def scaled_model():
    sampling = replace(toy_model().spec.sampling, quality_steps=(8, 4, 2, 1))
    model = toy_model(
        "scaled",
        elementwise,
        verifier=VerifierConfig("classifier", max_candidates=4),
        sampling=sampling,
    )
    return replace(model, verifier=LightVerifier())


def models() -> dict:
    found = fixture_models()
    model = scaled_model()
    found[model.spec.name, model.spec.version] = model
    return found


KEY = "dave-secret-key-42"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    entry = f"keys:\n- name: dave\n  sha256: {hash_key(KEY)}\n  max_samples_in_flight: 8\n"
    keys.write_text(entry)
    with serve(models(), api_key_file=str(keys)) as s:
        yield s


@pytest.fixture
def client(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, timeout=30, headers=headers) as c:
        yield c


BASE = {"model": "scaled", "prompt": "dark", "steps": 4, "seed": 7, "sampler": "dpmpp_2m"}


def mean_of(item: dict) -> float:
    """Mean pixel value of a PNG data item (what LightVerifier prefers)."""
    import io

    import numpy as np
    from PIL import Image

    png = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    return float(np.asarray(png, dtype=np.float64).mean())


def test_best_of_returns_the_verifiers_pick_and_reports_what_it_spent(client):
    plain = client.post("/v1/images/generations", json={**BASE, "n": 2})
    best = client.post("/v1/images/generations", json={**BASE, "n": 2, "best_of": 4})
    assert plain.status_code == 200 and best.status_code == 200, best.text
    body = best.json()
    assert body["nfe"] == 4 and body["total_nfe"] == 2 * 4 * 4
    assert plain.json()["total_nfe"] == 2 * 4 and plain.json()["scaling"] is None
    assert body["scaling"] == {
        "method": "best_of",
        "candidates": 4,
        "resample_every": None,
        "resamples": 0,
        "verifier": "fixture:light",
    }
    for item, first in zip(body["data"], plain.json()["data"], strict=True):
        assert isinstance(item["verifier_score"], float)
        assert "verifier_score" not in first
        assert mean_of(item) >= mean_of(first)  # candidate 0 is the plain image
        # the reported seed alone makes the chosen image again
        again = client.post("/v1/images/generations", json={**BASE, "seed": item["seed"]})
        assert again.json()["data"][0]["b64_json"] == item["b64_json"]


def test_steering_is_reproducible_over_http(client):
    req = {**BASE, "n": 2, "steps": 6, "steering": {"particles": 2, "resample_every": 2}}
    first = client.post("/v1/images/generations", json=req)
    again = client.post("/v1/images/generations", json=req)
    assert first.status_code == 200, first.text
    assert [d["b64_json"] for d in first.json()["data"]] == [
        d["b64_json"] for d in again.json()["data"]
    ]
    scaling = first.json()["scaling"]
    assert scaling["method"] == "steering" and scaling["resample_every"] == 2
    assert scaling["resamples"] == 2 and first.json()["total_nfe"] == 2 * 2 * 6


def test_the_openai_sdk_reads_a_best_of_response(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    out = client.images.generate(model="scaled", prompt="light", extra_body={"best_of": 2})
    assert len(out.data) == 1 and out.data[0].b64_json
    assert out.model_extra["total_nfe"] == 2 * 4


@pytest.mark.parametrize(
    ("changes", "status", "param", "needle"),
    [
        ({"best_of": 0}, 400, "best_of", "greater than or equal to 1"),
        ({"best_of": 5}, 400, "best_of", "best_of must be an integer in 1..4"),
        ({"steering": {"particles": 9}}, 400, "steering.particles", "in 1..4"),
        ({"steering": {"particles": 2, "resample_every": 0}}, 400, None, "greater than"),
        ({"steering": {"particles": 2, "every": 1}}, 400, None, "every"),
        ({"best_of": 2, "steering": {"particles": 2}}, 400, "steering", "alternatives"),
        ({"steering": {"particles": 2, "resample_every": 4}}, 400, "steering", "never"),
        ({"steering": {"particles": 2}, "sampler": "heun"}, 400, "steering", "one evaluation"),
        ({"steering": {"particles": 2}, "teleport": True}, 400, "steering", "teleport"),
        ({"model": "toy", "best_of": 2}, 400, "best_of", "has no verifier"),
        ({"best_of": 3, "n": 3}, 429, None, "samples in flight"),
    ],
)
def test_bad_scaling_requests_are_4xx_that_say_what_to_change(
    client, changes, status, param, needle
):
    r = client.post("/v1/images/generations", json={**BASE, **changes})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"]
    if param is not None:
        assert param in (error.get("param") or "")


def test_admission_and_the_queue_see_k_times_the_work(server, client):
    state = server.app.state.fewstep
    plain = admission.admit(state, Request("scaled", {"prompt": "dark", "n": 2}, steps=4))
    best = admission.admit(
        state, Request("scaled", {"prompt": "dark", "n": 2, "best_of": 3}, steps=4)
    )
    steer = admission.admit(
        state,
        Request("scaled", {"prompt": "dark", "n": 2, "steering": {"particles": 4}}, steps=4),
    )
    assert best.job.cost == 3 * plain.job.cost and steer.job.cost == 4 * plain.job.cost
    assert (best.job.rows, best.job.samples) == (6, 6)
    assert best.job.n == 2  # the images the caller gets back


def test_quality_auto_keeps_the_budgets_steering_can_run_with(server):
    state = server.app.state.fewstep
    fields = {"prompt": "dark", "n": 1, "steering": {"particles": 2, "resample_every": 2}}
    req = Request("scaled", fields, sampler="dpmpp_2m", deadline_ms=10_000, quality="auto")
    job = admission.admit(state, req).job
    # dpmpp_2m at 2 steps could not resample after step 2 and still run its 2 steps
    assert job.step_budgets == [8, 4] and job.steps == 8
    plain = Request("scaled", {"prompt": "dark"}, sampler="dpmpp_2m", deadline_ms=10_000)
    plain.quality = "auto"
    assert admission.admit(state, plain).job.step_budgets == [8, 4, 2]


def test_candidates_are_counted_in_the_metrics(client):
    before = _candidates(client)
    assert client.post("/v1/images/generations", json={**BASE, "best_of": 3}).status_code == 200
    assert _candidates(client) == before + 3


def _candidates(client) -> float:
    text = client.get("/metrics").text
    for line in text.splitlines():
        if line.startswith('fewstep_verifier_candidates_total{method="best_of",model="scaled"}'):
            return float(line.split()[-1])
    return 0.0


def test_same_request_alone_or_among_others_gives_the_same_images(client):
    """A steered request's images do not depend on what shares its forward passes."""
    import concurrent.futures

    req = {**BASE, "steps": 6, "steering": {"particles": 3, "resample_every": 1}}
    alone = client.post("/v1/images/generations", json=req).json()["data"]
    others = [{**BASE, "prompt": "light", "seed": s, "best_of": 2} for s in range(2)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client.post, "/v1/images/generations", json=o) for o in others]
        mine = pool.submit(client.post, "/v1/images/generations", json=req)
        assert all(f.result().status_code == 200 for f in futures)
    assert mine.result().json()["data"] == alone


def test_oip_takes_best_of_and_steering_and_returns_the_scores(client):
    meta = client.get("/v2/models/scaled").json()
    assert {"best_of", "steering_particles", "resample_every"} <= {
        t["name"] for t in meta["inputs"]
    }

    def infer(*extra):
        inputs = [
            {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["dark", "light"]},
            {"name": "seed", "datatype": "INT64", "shape": [1], "data": [3]},
            {"name": "steps", "datatype": "INT32", "shape": [1], "data": [4]},
            *({"name": n, "datatype": "INT32", "shape": [1], "data": [v]} for n, v in extra),
        ]
        return client.post("/v2/models/scaled/infer", json={"inputs": inputs})

    best = infer(("best_of", 3))
    assert best.status_code == 200, best.text
    out = {o["name"]: o for o in best.json()["outputs"]}
    assert out["verifier_score"]["shape"] == [2] and out["image"]["shape"][0] == 2
    steer = infer(("steering_particles", 2), ("resample_every", 1))
    assert steer.status_code == 200, steer.text
    plain = {o["name"]: o for o in infer().json()["outputs"]}
    assert plain["verifier_score"]["shape"] == [0]
    bad = infer(("best_of", 9))
    assert bad.status_code == 400 and "best_of" in bad.json()["error"]
    lonely = infer(("resample_every", 2))
    assert lonely.status_code == 400 and "steering_particles" in lonely.json()["error"]


def test_a_best_of_job_reports_its_scores_and_spend(client):
    job = client.post("/v1/jobs", json={**BASE, "n": 2, "best_of": 2})
    assert job.status_code == 202, job.text
    result = client.get(f"/v1/jobs/{job.json()['id']}/result", params={"wait": 20})
    body = result.json()
    assert result.status_code == 200 and body["total_nfe"] == 2 * 2 * 4
    assert body["scaling"]["method"] == "best_of"
    assert all(isinstance(d["verifier_score"], float) for d in body["data"])
