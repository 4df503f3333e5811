"""Tuned grids over the wire: the `grid` request field, its 400s, the grid a response
reports, /v1/models' tuned budgets, the Job's JSON round trip and the OIP `grid` input."""

from __future__ import annotations

import base64
from dataclasses import replace

import httpx
import numpy as np
import pytest
import torch

from engines.media import ENCODINGS
from engines.modalities.image import ImageInputs
from engines.noise import row_seeds
from engines.repository import TunedGrid
from engines.samplers import drive
from engines.sampling import start_sampler
from service.jobs import Job

from .conftest import fixture_models, serve, toy_model

TUNED = TunedGrid(
    sigmas=(80.0, 2.0, 0.3, 0.0),
    objective="ref-mse",
    n_search=64,
    n_eval=200,
    seed=0,
    fd_before=2.0,
    fd_after=1.0,
    accuracy_before=0.8,
    accuracy_after=0.9,
)
# a 4-step grid whose sample ends at sigma 0.01, its last step second order
ORDERED = replace(TUNED, sigmas=(80.0, 6.0, 0.8, 0.08, 0.01), orders=(1, 2, 2, 2))
ORDERED_MODEL = toy_model("ordered", grids={"dpmpp_2m": {4: ORDERED}})


@pytest.fixture(scope="module")
def server():
    tuned = toy_model("tuned", grids={"dpmpp_2m": {3: TUNED}})
    own = toy_model("own-orders", grids={"dpmpp_2m": {4: replace(ORDERED, orders=None)}})
    models = {**fixture_models(), ("tuned", 1): tuned, ("ordered", 1): ORDERED_MODEL}
    with serve({**models, ("own-orders", 1): own}) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def generate(client, **fields):
    body = {"model": "tuned", "prompt": "dark", "seed": 5, "sampler": "dpmpp_2m", **fields}
    return client.post("/v1/images/generations", json=body)


def test_the_tuned_grid_is_the_default_where_one_exists(client):
    auto, tuned, karras = (
        generate(client, steps=3, **g).json() for g in ({}, {"grid": "tuned"}, {"grid": "karras"})
    )
    assert (auto["grid"], tuned["grid"], karras["grid"]) == ("tuned", "tuned", "karras")
    assert auto["data"] == tuned["data"] and auto["data"] != karras["data"]
    assert auto["nfe"] == karras["nfe"] == 3
    # other steps, or another sampler: the plain grid, whatever `auto` may pick
    assert generate(client, steps=4).json()["grid"] == "karras"
    assert generate(client, steps=3, sampler="unipc").json()["grid"] == "karras"
    assert generate(client, steps=3, teleport=True).json()["grid"] == "teleport"


def test_a_tuned_grid_with_orders_is_served_exactly_as_written(client):
    made = {m: generate(client, model=m, steps=4).json() for m in ("ordered", "own-orders")}
    assert made["ordered"]["grid"] == made["own-orders"]["grid"] == "tuned"
    assert made["ordered"]["nfe"] == 4
    model = ORDERED_MODEL
    label = torch.tensor([model.spec.label_id("dark")])
    grid = torch.tensor(ORDERED.sigmas, dtype=torch.float64)
    gen, cond, _ = start_sampler(
        model, "dpmpp_2m", 4, row_seeds(5, 1), label, grid=grid, orders=ORDERED.orders
    )
    png = ENCODINGS["png"][0](model.decode(drive(gen, model.denoiser, cond)), (-1.0, 1.0))[0]
    assert made["ordered"]["data"][0]["b64_json"] == base64.b64encode(png).decode()
    # the same sigmas with the sampler's own schedule (last step first order) differ
    assert made["own-orders"]["data"] != made["ordered"]["data"]


def test_a_model_without_tuned_grids_serves_karras(client):
    body = {"model": "toy", "prompt": "dark", "steps": 3, "sampler": "dpmpp_2m"}
    assert client.post("/v1/images/generations", json=body).json()["grid"] == "karras"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"steps": 4, "grid": "tuned"},
            "model tuned has no tuned grid for sampler dpmpp_2m with 4 steps; its tuned grids "
            "are dpmpp_2m: steps [3]; send grid 'karras' or 'auto', or those steps",
        ),
        ({"steps": 3, "sampler": "unipc", "grid": "tuned"}, "no tuned grid for sampler unipc"),
        ({"steps": 3, "grid": "fancy"}, "grid: Input should be 'auto', 'tuned' or 'karras'"),
        ({"steps": 3, "grid": "tuned", "teleport": True}, "teleport keeps its own grid"),
    ],
)
@pytest.mark.parametrize("endpoint", ["/v1/images/generations", "/v1/jobs"])
def test_grid_requests_that_cannot_work_get_a_400(client, endpoint, fields, message):
    body = {"model": "tuned", "prompt": "dark", "sampler": "dpmpp_2m", **fields}
    response = client.post(endpoint, json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_untuned_model_refuses_tuned_and_says_it_has_none(client):
    body = {"model": "toy", "prompt": "dark", "steps": 3, "grid": "tuned"}
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 400
    assert "it has none (run `fewstep tune`)" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "grid"


def test_models_list_the_tuned_budgets(client):
    assert client.get("/v1/models/tuned").json()["tuned_grids"] == {"dpmpp_2m": [3]}
    assert client.get("/v1/models/toy").json()["tuned_grids"] == {}


def test_the_job_api_reports_the_grid(client):
    body = {"model": "tuned", "prompt": "dark", "steps": 3, "sampler": "dpmpp_2m", "grid": "karras"}
    job = client.post("/v1/jobs", json=body).json()
    result = client.get(f"/v1/jobs/{job['id']}/result", params={"wait": 30}).json()
    assert result["grid"] == "karras"


def test_the_grid_survives_the_queue_json():
    job = Job("tuned", 1, ImageInputs([0], grid="karras"), 1, "dpmpp_2m", 3, 1)
    again = Job.from_dict(job.to_dict())
    assert again.inputs == job.inputs and again.inputs.grid == "karras"
    old = job.to_dict()
    del old["inputs"]["grid"]  # a job queued by a server from before grids
    assert Job.from_dict(old).inputs.grid == "auto"


def oip_body(grid: str | None) -> dict:
    inputs = [
        {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["dark"]},
        {"name": "seed", "datatype": "INT64", "shape": [1], "data": [5]},
        {"name": "steps", "datatype": "INT32", "shape": [1], "data": [3]},
        {"name": "sampler", "datatype": "BYTES", "shape": [1], "data": ["dpmpp_2m"]},
    ]
    if grid is not None:
        inputs.append({"name": "grid", "datatype": "BYTES", "shape": [1], "data": [grid]})
    return {"inputs": inputs}


def test_oip_takes_a_grid_input(client):
    def image(grid):
        response = client.post("/v2/models/tuned/infer", json=oip_body(grid))
        assert response.status_code == 200, response.text
        return np.asarray(response.json()["outputs"][0]["data"])

    assert np.array_equal(image(None), image("tuned"))
    assert not np.array_equal(image(None), image("karras"))
    bad = client.post("/v2/models/tuned/infer", json=oip_body("fancy"))
    assert bad.status_code == 400
    assert bad.json()["error"] == "input 'grid': Input should be 'auto', 'tuned' or 'karras'"
    steps4 = oip_body("tuned")
    steps4["inputs"][2]["data"] = [4]
    refused = client.post("/v2/models/tuned/infer", json=steps4)
    assert (
        refused.status_code == 400
        and "no tuned grid for sampler dpmpp_2m with 4" in (refused.json()["error"])
    )
