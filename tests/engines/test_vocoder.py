"""The neural vocoder: inverse STFT, ONNX vs torch, batch invariance, model.yaml setting,
the recipe, and the recogniser behind `fewstep eval-speech`'s WER."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import soundfile as sf
import torch
import yaml

from engines.nets import config_to_dict
from engines.nets.vocoder import InverseSTFT, VocoderConfig, Vocos
from engines.repository import Repository, RepositoryError
from engines.repository.vocoders import NeuralVocoder
from engines.runtimes.export import EngineCache
from engines.samplers import drive
from engines.speech import corpus
from engines.speech.audio import GriffinLim, MelConfig, log_mel
from engines.training import common
from service.cli import main

SHIPPED = Path(__file__).parents[2] / "model_repo"
TINY = VocoderConfig(width=16, blocks=2, expand=2)


def tiny_vocoder(seed: int = 0) -> Vocos:
    torch.manual_seed(seed)
    net = Vocos(TINY)
    with torch.no_grad():  # a louder head than at initialisation: outputs far from zero
        net.head.weight.normal_(0, 0.3)
        net.set_stats(torch.full((80,), -5.0), torch.full((80,), 2.0))
    return net.eval().requires_grad_(False)


def write_vocoder(root: Path, name: str = "tiny-vocos", cfg: VocoderConfig = TINY, **extra):
    folder = root / "_vocoders" / name
    (folder / "1").mkdir(parents=True)
    common.save_weights(tiny_vocoder(), folder / "1" / "weights.safetensors")
    meta = {"name": name, "kind": "vocos", "sample_rate": 22050, "network": config_to_dict(cfg)}
    (folder / "vocoder.yaml").write_text(yaml.safe_dump({**meta, **extra}))
    return folder


def mels(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded random log-mels; the padding holds garbage (batch-mates must not see it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), 80, max(lengths), generator=g) * 2 - 5
    return x, torch.tensor(lengths)


def test_inverse_stft_is_torch_istft_both_ways():
    wave = torch.randn(2, 256 * 40, generator=torch.Generator().manual_seed(0))
    spec = torch.stft(wave, 1024, 256, window=torch.hann_window(1024), return_complex=True)
    istft = InverseSTFT(1024, 256)
    fft = istft(spec.real, spec.imag)
    istft.use_fft = False
    ola = istft(spec.real, spec.imag)
    assert fft.shape == ola.shape == (2, 256 * 40)
    assert (fft - wave).abs().max() < 1e-5 and (ola - fft).abs().max() < 1e-5


def test_a_row_does_not_depend_on_its_batch_mates():
    net = tiny_vocoder()
    x, frames = mels([37, 90, 12])
    with torch.no_grad():
        batch = net(x, frames)
        for i, n in enumerate(frames.tolist()):
            alone = net(x[i : i + 1, :, :n], frames[i : i + 1])[0]
            assert alone.shape == ((n - 1) * 256,)
            assert alone.abs().max() > 1e-3  # not trivially silent
            torch.testing.assert_close(batch[i, : len(alone)], alone, atol=1e-5, rtol=1e-4)
            assert (batch[i, len(alone) :] == 0).all()  # silence past the row's end


def test_onnx_runtime_vocoder_matches_torch_and_is_batch_invariant(tmp_path):
    root = tmp_path / "repo"
    write_vocoder(root)
    onnx = Repository(root).vocoder("tiny-vocos", cache=EngineCache(tmp_path / "cache"))
    eager = Repository(root).vocoder("tiny-vocos", runtimes=["torch"])
    assert isinstance(onnx, NeuralVocoder) and onnx.runtime.name == "onnxruntime"
    assert eager.runtime.name == "torch"
    manifest = next((tmp_path / "cache").rglob("manifest.json")).read_text()
    assert "max_abs_error_fp32" in manifest
    x, frames = mels([120, 41, 77, 5])
    got, want = onnx(x, frames), eager(x, frames)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape == ((int(frames[i]) - 1) * 256,)
        assert (g - w).abs().max() < 1e-4
        alone = onnx(x[i : i + 1, :, : int(frames[i])], frames[i : i + 1])[0]
        assert (alone - g).abs().max() < 1e-5


def test_speech_model_yaml_names_its_vocoder_and_it_is_checked(tmp_path):
    shutil.copytree(SHIPPED / "speech-prodiff", tmp_path / "speech-prodiff")
    path = tmp_path / "speech-prodiff" / "model.yaml"
    original = yaml.safe_load(path.read_text())

    def with_vocoder(value) -> None:
        data = {**original, "speech": {**original["speech"], "vocoder": value}}
        path.write_text(yaml.safe_dump(data))

    with_vocoder("griffin-lim")
    model = Repository(tmp_path).load("speech-prodiff")
    assert isinstance(model.speech.vocoder, GriffinLim)
    with_vocoder("no-such-vocoder")
    with pytest.raises(RepositoryError, match=r"speech.vocoder: no vocoder 'no-such-vocoder'"):
        Repository(tmp_path)
    with_vocoder("Bad Name!")
    with pytest.raises(RepositoryError, match="vocoder must be 'griffin-lim' or the name"):
        Repository(tmp_path)
    write_vocoder(tmp_path, "hop-200", VocoderConfig(width=16, blocks=1, hop=200))
    with_vocoder("hop-200")
    with pytest.raises(RepositoryError, match="hop 200; the model makes 80 mels at 22050 Hz, hop"):
        Repository(tmp_path)
    write_vocoder(tmp_path, "tiny-vocos", runtimes=["no-such-runtime"])
    with_vocoder("tiny-vocos")
    with pytest.raises(RepositoryError, match="runtimes must be a list of distinct names"):
        Repository(tmp_path)


def prodiff_with_tiny_vocoder(tmp_path: Path):
    """The shipped speech-prodiff, copied under tmp_path, loaded with `speech.vocoder` set
    to a tiny neural vocoder (ONNX Runtime, its own build cache)."""
    shutil.copytree(SHIPPED / "speech-prodiff", tmp_path / "speech-prodiff")
    write_vocoder(tmp_path)
    path = tmp_path / "speech-prodiff" / "model.yaml"
    data = yaml.safe_load(path.read_text())
    data["speech"]["vocoder"] = "tiny-vocos"
    path.write_text(yaml.safe_dump(data))
    cache = EngineCache(tmp_path.parent / f"{tmp_path.name}-cache")
    model = Repository(tmp_path).load("speech-prodiff", cache=cache)
    return model


def test_a_speech_model_with_a_neural_vocoder_speaks_a_padded_batch(tmp_path):
    """Sentences of different lengths share one vocoder pass and come out as each alone."""
    model = prodiff_with_tiny_vocoder(tmp_path)
    speech = model.speech
    assert isinstance(speech.vocoder, NeuralVocoder)
    # the vocoder's weights are part of the model's fingerprint
    assert model.fingerprint != Repository.of_folder(SHIPPED / "speech-prodiff").spec(
        "speech-prodiff"
    ) and model.fingerprint != _griffin_lim_fingerprint(tmp_path)
    prepared = speech.prepare(["A much longer sentence than the next one.", "Yes."])
    assert prepared.frames[0] > 2 * prepared.frames[1] and prepared.mask[1, 0, -1] == 0
    gen, cond, _ = speech.start(prepared, "ddpm", 2, [0, 1])
    x = drive(gen, model.denoiser, cond)
    calls = []
    inner = speech.vocoder.runtime.forward
    speech.vocoder.runtime.forward = lambda inputs: calls.append(inputs) or inner(inputs)
    together = speech.waves(x, prepared.frames)
    assert len(calls) == 1 and calls[0]["mel"].shape[0] == 2  # one pass for both rows
    for i, n in enumerate(prepared.frames.tolist()):
        alone = speech.waves(x[i : i + 1, :, :n], prepared.frames[i : i + 1])[0]
        assert together[i].shape == alone.shape == ((n - 1) * 256,)
        assert (together[i] - alone).abs().max() < 1e-5


def _griffin_lim_fingerprint(root: Path) -> str:
    path = root / "speech-prodiff" / "model.yaml"
    text = path.read_text()
    data = yaml.safe_load(text)
    data["speech"]["vocoder"] = "griffin-lim"
    path.write_text(yaml.safe_dump(data))
    try:
        return Repository(root).load("speech-prodiff").fingerprint
    finally:
        path.write_text(text)


def test_vocoder_recipe_learns_and_writes_a_package_that_loads(tmp_path):
    data = tmp_path / "data"
    assert (
        main(["train", "speech-data", "--out", str(data), "--utterances", "8", "--test", "2"]) == 0
    )
    out = tmp_path / "repo" / "_vocoders" / "slt-vocos"
    args = ["train", "vocoder", "--data", str(data / "corpus.pt"), "--out", str(out)]
    args += ["--work", str(tmp_path / "w"), "--width", "16", "--blocks", "1", "--segment", "16"]
    args += ["--batch", "4", "--max-minutes", "0", "--log-every", "10", "--threads", "1"]
    assert main([*args, "--steps", "80", "--lr", "5e-3"]) == 0
    card = (out / "1" / "MODEL_CARD.md").read_text()
    assert "fewstep train vocoder" in card and "cmu_us_slt_arctic_hts" in card
    vocoder = Repository(tmp_path / "repo").vocoder("slt-vocos", runtimes=["torch"])
    train = corpus.load(data / "corpus.pt")["train"][0]
    wave, _ = sf.read(data / "wav" / "00002.wav", dtype="float32")
    target = torch.from_numpy(wave)
    mel = train["mel"].float()[None]
    got = vocoder(mel, torch.tensor([mel.shape[-1]]))[0]
    assert got.shape == ((mel.shape[-1] - 1) * 256,)
    fresh = Vocos(vocoder.spec.network)
    fresh.set_stats(mel[0].mean(1), mel[0].std(1))
    with torch.no_grad():
        before = fresh(mel, torch.tensor([mel.shape[-1]]))[0]
    cfg = MelConfig()

    def distance(w: torch.Tensor) -> float:
        n = min(len(w), len(target))
        return float((log_mel(w[:n], cfg) - log_mel(target[:n], cfg)).abs().mean())

    assert distance(got) < 0.85 * distance(before)


# -- the recogniser: word error rate ---------------------------------------------------------


def test_word_error_rate_counts_substitutions_deletions_and_insertions():
    from engines.speech.asr import edit_distance, wer, words

    assert words("Well-known: it's a DOG's life!") == [
        "well",
        "known",
        "it's",
        "a",
        "dog's",
        "life",
    ]
    assert edit_distance(["a", "b", "c", "d"], ["a", "x", "c", "d", "e"]) == 2
    assert edit_distance([], ["a"]) == 1 and edit_distance(["a"], []) == 1
    assert wer(["The cat sat.", "On the mat."], ["the cat sat", "on mat"]) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="no words"):
        wer(["..."], ["a"])


def festival_wav(text: str, wav):
    """Festival's own audio of `text` (the slt HTS voice, the corpus' teacher voice)."""
    subprocess.run(
        ["text2wave", "-eval", "(voice_cmu_us_slt_arctic_hts)", "-o", str(wav)],
        input=text.encode(),
        check=True,
        capture_output=True,
    )
    return wav


def test_festival_audio_of_a_sentence_is_recognised(tmp_path):
    from engines.speech.asr import Recognizer, wer

    text = "She looked at the big black dog in the garden."
    wav = festival_wav(text, tmp_path / "s.wav")
    samples, rate = sf.read(wav, dtype="float32")
    asr = Recognizer()
    heard = asr(torch.from_numpy(samples), rate)
    assert wer([text], [heard]) <= 0.2, heard
    noise = torch.randn(len(samples), generator=torch.Generator().manual_seed(0)) * 0.1
    assert wer([text], [asr(noise, rate)]) >= 0.8  # noise of the same length: not the text


def test_shipped_vocoder_is_small_documented_and_resynthesises_festival_audio(tmp_path):
    folder = SHIPPED / "_vocoders" / "slt-vocos"
    weights = folder / "1" / "weights.safetensors"
    assert weights.stat().st_size < 20e6
    card = (folder / "1" / "MODEL_CARD.md").read_text()
    assert "fewstep train vocoder" in card and "cmu_us_slt_arctic_hts" in card
    assert "## Quality" in card and "Not measured" not in card
    text = "The old man walked slowly along the quiet road."
    wav = festival_wav(text, tmp_path / "s.wav")
    import soxr

    samples, rate = sf.read(wav, dtype="float32")
    wave = torch.from_numpy(soxr.resample(samples, rate, 22050).astype("float32"))
    cfg = MelConfig()
    mel = log_mel(wave, cfg)
    vocoder = Repository(SHIPPED).vocoder("slt-vocos", runtimes=["torch"])
    out = vocoder(mel[None], torch.tensor([mel.shape[1]]))[0]
    n = len(out)
    # 0.20 nats measured on a held-out sentence; an untrained network is above 2
    assert float((log_mel(out, cfg) - log_mel(wave[:n], cfg)).abs().mean()) < 0.3


def test_requests_finishing_in_one_pass_share_one_vocoder_pass(tmp_path):
    """Two speech requests of different lengths that finish in the same forward pass are
    vocoded in one pass (all their sentences), each getting the audio it gets alone; a
    canceled one among them fails alone and takes no rows."""
    import numpy as np

    from engines.modalities import SpeechInputs
    from service.jobs import Job
    from service.worker.scheduler import start, step_batch

    model = prodiff_with_tiny_vocoder(tmp_path)
    texts = (["A much longer sentence than the next one.", "Yes."], ["Short one."], ["Gone."])

    def job(sentences, seed):
        j = Job("speech-prodiff", 1, SpeechInputs(sentences), len(sentences), "ddpm", 2, seed=seed)
        j.output_format = "f32"
        return j

    def run(actives):
        calls = []
        inner = model.speech.vocoder.runtime.forward
        model.speech.vocoder.runtime.forward = lambda i: calls.append(i) or inner(i)
        try:
            while True:
                outcomes, _ = step_batch(actives)
                if all(o.kind != "step" for o in outcomes):
                    return outcomes, calls
        finally:
            model.speech.vocoder.runtime.forward = inner

    together = [start(job(t, seed), model) for seed, t in enumerate(texts)]
    together[2].canceled = True
    outcomes, calls = run(together)
    assert [o.kind for o in outcomes] == ["done", "done", "failed"]
    assert outcomes[2].code == "canceled"
    assert len(calls) == 1 and calls[0]["mel"].shape[0] == 3  # 2 + 1 sentences, one pass
    for seed, (t, outcome) in enumerate(zip(texts[:2], outcomes, strict=False)):
        (alone,), alone_calls = run([start(job(t, seed), model)])
        assert len(alone_calls) == 1
        a = np.frombuffer(outcome.outputs[0], "<f4")
        b = np.frombuffer(alone.outputs[0], "<f4")
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5
        assert outcome.info.duration == alone.info.duration

    def shared_pass_fails(*args, **kwargs):
        raise RuntimeError("the shared vocoder pass failed")

    model.speech.render_many = shared_pass_fails  # then each request is finished alone
    outcomes, calls = run([start(job(t, seed), model) for seed, t in enumerate(texts[:2])])
    assert [o.kind for o in outcomes] == ["done", "done"] and len(calls) == 2
