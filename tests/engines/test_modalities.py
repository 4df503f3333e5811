"""The Modality contract: typed payloads, request checks, cost, OIP mapping."""

from __future__ import annotations

import json

import pytest

from engines.modalities import (
    AudioInfo,
    ImageInfo,
    ImageInputs,
    InputError,
    SpeechInputs,
    info_from_dict,
    inputs_from_dict,
    modality_named,
    modality_of,
)
from service.jobs import Job, JobResult, JobState
from tests.service.conftest import toy_spec


@pytest.mark.parametrize(
    "inputs",
    [ImageInputs([0, 1], guidance_scale=2.0, teleport=True), SpeechInputs(["Hi.", "Bye."], 0.5)],
)
def test_job_inputs_survive_json(inputs):
    job = Job("m", 1, inputs, 2, "euler", 3, 7)
    again = Job.from_dict(json.loads(json.dumps(job.to_dict())))
    assert again == job and type(again.inputs) is type(inputs)
    assert inputs_from_dict(inputs.to_dict()) == inputs


@pytest.mark.parametrize("info", [ImageInfo(28, 28), AudioInfo(22050, 1.5), None])
def test_result_info_survives_json(info):
    result = JobResult("job_1", JobState.SUCCEEDED, [b"\x00\x01"], info=info)
    again = JobResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result
    if info is not None:
        assert info_from_dict(info.to_dict()) == info


def test_rows_and_cost_come_from_the_modality():
    spec = toy_spec("toy")
    image = modality_of(spec)
    guided = ImageInputs([0] * 3, guidance_scale=2.0)
    assert Job("toy", 1, guided, 3, "euler", 4, 0).rows == 6
    assert image.cost(spec, guided, 3, 4).row_steps == 24
    assert modality_named("speech").cost(spec, SpeechInputs(["a.", "b."]), 2, 2).rows == 2


def test_image_requests_are_checked_against_the_spec():
    spec = toy_spec("toy")
    image = modality_of(spec)
    inputs, n = image.parse(spec, {"prompt": "white", "n": 3})
    assert inputs.labels == [1, 1, 1] and n == 3  # a synonym
    for fields, param in (
        ({"prompt": "grey"}, "prompt"),
        ({"prompt": "dark", "n": 9}, "n"),
        ({"prompt": "dark", "size": "8x8"}, "size"),
        ({"prompt": "dark", "guidance_scale": 2.0}, "guidance_scale"),
    ):
        with pytest.raises(InputError) as err:
            image.parse(spec, fields)
        assert err.value.param == param and spec.name in err.value.message


def test_image_oip_tensors_map_to_one_label_per_image():
    spec = toy_spec("toy")
    image = modality_of(spec)
    fields = image.from_tensors(spec, {"label": [b"dark", b"white"], "seed": [3]})
    assert fields["labels"] == [0, 1] and fields["n"] == 2
    with pytest.raises(InputError, match="element 1: 'grey'"):
        image.from_tensors(spec, {"label": [b"dark", b"grey"]})
    names = ["label", "seed", "steps", "sampler", "grid", "teleport"]
    assert list(image.signature(spec).inputs) == names
    assert image.from_tensors(spec, {"label": [b"dark"], "grid": [b"karras"]})["grid"] == "karras"
    out = image.to_tensors(spec, [bytes(16), bytes(16)], [5, 6], ImageInfo(4, 4))
    assert out["image"].shape == [2, 4, 4, 1] and len(out["seed"].raw) == 16
