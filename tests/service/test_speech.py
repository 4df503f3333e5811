"""POST /v1/audio/speech and OIP speech on a real server, with tiny speech fixture models."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
import tritonclient.grpc as grpcclient

from engines.modalities import SpeechInputs
from service.jobs import Job
from service.worker.scheduler import forward, start
from tests.engines.speech_fixture import tiny_speech_model

from .conftest import fixture_models, serve

LONG = "The old lighthouse keeper climbed the stairs again, counting every step aloud."


@pytest.fixture(scope="module")
def speech_server():
    models = fixture_models()
    for m in (tiny_speech_model(), tiny_speech_model("speech-cm", "consistency")):
        models[m.spec.name, 1] = m
    with serve(models, grpc=True, grpc_port=0, host="127.0.0.1") as s:
        s.grpc_url = f"127.0.0.1:{s.app.state.grpc_port}"
        yield s


@pytest.fixture
def api(speech_server):
    with httpx.Client(base_url=speech_server.url, timeout=60) as c:
        yield c


def speak(api, text: str, **extra) -> httpx.Response:
    body = {"model": "speech-tiny", "input": text, "voice": "alloy", "seed": 1, **extra}
    return api.post("/v1/audio/speech", json={"response_format": "wav", **body})


def test_wav_parses_at_the_stated_rate_and_grows_with_the_text(api):
    short, long = speak(api, "Hello."), speak(api, LONG)
    assert short.status_code == long.status_code == 200
    assert short.headers["content-type"] == "audio/wav"
    a, rate = sf.read(io.BytesIO(short.content))
    b, rate_b = sf.read(io.BytesIO(long.content))
    assert rate == rate_b == 22050 == int(short.headers["x-fewstep-sample-rate"])
    assert len(b) > 3 * len(a) > 0
    seconds = float(long.headers["x-fewstep-audio-seconds"])
    assert seconds == pytest.approx(len(b) / rate, abs=0.01)


def test_the_same_seed_gives_the_same_bytes(api):
    first, again = speak(api, LONG, seed=7), speak(api, LONG, seed=7)
    assert first.content == again.content
    assert speak(api, LONG, seed=8).content != first.content


def test_pcm_and_flac(api):
    wav, _ = sf.read(io.BytesIO(speak(api, LONG).content), dtype="int16")
    pcm = speak(api, LONG, response_format="pcm")
    assert pcm.headers["content-type"] == "audio/pcm"
    assert np.array_equal(np.frombuffer(pcm.content, "<i2"), wav)  # raw 16-bit, same samples
    flac, rate = sf.read(
        io.BytesIO(speak(api, LONG, response_format="flac").content), dtype="int16"
    )
    assert rate == 22050 and np.array_equal(flac, wav)


def test_speed_scales_the_durations(api):
    normal = sf.read(io.BytesIO(speak(api, LONG).content))[0]
    fast = sf.read(io.BytesIO(speak(api, LONG, speed=2.0).content))[0]
    assert 0.4 < len(fast) / len(normal) < 0.65


def test_sentences_are_synthesised_as_one_batch_and_joined(api):
    one = speak(api, "Good morning.")
    three = speak(api, "Good morning. Good morning. Good morning.")
    assert three.headers["x-fewstep-nfe"] == one.headers["x-fewstep-nfe"] == "2"
    n1 = len(sf.read(io.BytesIO(one.content))[0])
    n3 = len(sf.read(io.BytesIO(three.content))[0])
    assert n3 == pytest.approx(3 * n1 + 2 * int(0.15 * 22050), abs=10)


@pytest.mark.parametrize("voice", ["alloy", "nova", "shimmer", "slt", "Echo"])
def test_openai_voices_map_onto_the_model_voice(api, voice):
    assert speak(api, "Hi.", voice=voice).status_code == 200


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"input": ""}, "input is empty"),
        ({"input": "   "}, "input is empty"),
        ({"input": "word " * 100}, "at most 400"),
        ({"input": "One. Two. Three. Four. Five."}, "at most 4 per request"),
        ({"voice": "bob"}, "['slt']"),
        ({"response_format": "aac"}, "use one of ['wav', 'flac', 'pcm'"),
        ({"sampler": "euler_ancestral"}, "use one of ['ddpm', 'heun', 'euler']"),
        ({"steps": 9}, "steps must be in 1..8"),
        ({"model": "toy"}, "makes images, not speech"),
        ({"model": "nope"}, "unknown model"),
        ({"instructions": "whisper"}, "not supported"),
        ({"speed": 5}, "speed"),
        ({"colour": "red"}, "unknown field 'colour'"),
    ],
)
def test_bad_requests_say_what_to_change(api, body, needle):
    r = api.post(
        "/v1/audio/speech",
        json={"model": "speech-tiny", "input": "Hello.", "voice": "alloy", **body},
    )
    assert r.status_code in (400, 404), r.text
    assert needle in r.json()["error"]["message"]


def test_images_endpoint_refuses_a_speech_model(api):
    r = api.post("/v1/images/generations", json={"model": "speech-tiny", "prompt": "x"})
    assert r.status_code == 400 and "/v1/audio/speech" in r.json()["error"]["message"]


def test_consistency_model_one_step_and_more(api):
    for steps in (1, 3):
        r = speak(api, "Hello there.", model="speech-cm", steps=steps)
        assert r.status_code == 200 and r.headers["x-fewstep-nfe"] == str(steps)


def test_models_list_voices_and_limits(api):
    tiny = api.get("/v1/models/speech-tiny").json()
    assert tiny["kind"] == "speech" and tiny["voices"] == ["slt"]
    assert tiny["sample_rate"] == 22050 and tiny["max_input_chars"] == 400
    assert {"wav", "flac", "pcm"} <= set(tiny["response_formats"])


def test_metrics_gain_the_real_time_factor(api):
    speak(api, "Hello.")
    text = api.get("/metrics").text
    line = next(
        x
        for x in text.splitlines()
        if x.startswith("fewstep_real_time_factor_count{") and 'model="speech-tiny"' in x
    )
    assert float(line.split()[-1]) >= 1


def test_oip_v2_text_in_audio_and_sample_rate_out(api):
    body = {
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [1], "data": [LONG]},
            {"name": "seed", "datatype": "INT64", "shape": [1], "data": [1]},
        ]
    }
    r = api.post("/v2/models/speech-tiny/infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["sample_rate"]["data"] == [22050] and out["audio"]["datatype"] == "FP32"
    audio = np.asarray(out["audio"]["data"], dtype=np.float32)
    assert out["audio"]["shape"] == [len(audio)]
    pcm = np.frombuffer(speak(api, LONG, response_format="pcm").content, "<i2")
    assert len(pcm) == len(audio)  # the same request, the same samples
    assert np.abs(np.round(np.clip(audio, -1, 1) * 32767) - pcm).max() <= 1
    meta = api.get("/v2/models/speech-tiny").json()
    assert {t["name"] for t in meta["inputs"]} >= {"text", "seed", "speed"}
    missing = api.post("/v2/models/speech-tiny/infer", json={"inputs": body["inputs"][1:]})
    assert missing.status_code == 400 and "'text'" in missing.json()["error"]


def test_oip_grpc_with_tritonclient(api, speech_server):
    client = grpcclient.InferenceServerClient(speech_server.grpc_url)
    text = grpcclient.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([LONG.encode()], dtype=object))
    seed = grpcclient.InferInput("seed", [1], "INT64")
    seed.set_data_from_numpy(np.array([1], dtype=np.int64))
    result = client.infer("speech-tiny", [text, seed])
    client.close()
    audio = result.as_numpy("audio")
    assert audio.dtype == np.float32 and result.as_numpy("sample_rate").tolist() == [22050]
    pcm = np.frombuffer(speak(api, LONG, response_format="pcm").content, "<i2")
    assert np.abs(np.round(np.clip(audio, -1, 1) * 32767) - pcm).max() <= 1


def test_rows_of_different_lengths_share_a_pass_as_if_alone():
    """Continuous batching of speech: requests of different lengths are padded and masked
    in one forward pass, and each gets what it would get alone."""
    model = tiny_speech_model()
    texts = [["Hi."], [LONG], ["A middle one.", "And another."]]

    def actives():
        jobs = [
            Job("speech-tiny", 1, SpeechInputs(t), len(t), "ddpm", 2, seed=i, output_format="wav")
            for i, t in enumerate(texts)
        ]
        return [start(job, model) for job in jobs]

    together = forward(actives())
    alone = [forward([a])[0] for a in actives()]
    assert len({x.shape[-1] for x in together}) == 3
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
