"""Speech engine: Festival front end, corpus recipe, features, vocoder, net, metrics, recipes."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import soundfile as sf
import torch

from engines.nets.tts import TTS, length_regulate
from engines.quality_speech import mcd_dtw
from engines.repository import Repository
from engines.samplers import drive
from engines.speech import corpus, frontend
from engines.speech.audio import GriffinLim, MelConfig, Stopped, encode, log_mel
from engines.speech.model import TooLong, split_sentences
from service.cli import main
from tests.engines.speech_fixture import TINY, tiny_speech_model

SHIPPED = Path(__file__).parents[2] / "model_repo"
LONG_TEXT = "The committee will meet again on Tuesday to discuss the new budget."
SPEECH = ("speech-teacher", "speech-prodiff", "speech-comospeech")


def phones(text: str) -> list[str]:
    return [s.phone for s in frontend.shared().segments(text)]


def test_front_end_expands_numbers_and_abbreviations():
    twelve = ["t", "w", "eh", "l", "v"]
    seq = " ".join(phones("Dr. Smith has 12 cats."))
    assert " ".join(twelve) in seq  # 12 -> twelve
    assert seq.startswith("pau d aa k t er")  # Dr. -> doctor
    money = " ".join(phones("It costs $5."))
    assert "f ay v" in money and "d aa l er z" in money  # $5 -> five dollars


def test_front_end_is_one_long_lived_process():
    fest = frontend.shared()
    fest.segments("one")
    first = fest._proc.pid
    fest.segments("two")
    assert fest._proc.pid == first


def test_front_end_quotes_text_safely():
    assert phones('She said "no" \\ then left.')[-1] == "pau"


def test_ids_mark_word_ends_and_stress():
    ids = frontend.shared().phones("Hello world.")
    names = [frontend.PHONES[i - 1] for i in ids.phone.tolist()]
    assert names[0] == names[-1] == "pau"
    ends = [n for n, f in zip(names, ids.final.tolist(), strict=True) if f]
    assert ends == ["ow", "d"]  # hello, world
    assert ids.stress.max() == 1


def test_split_sentences():
    assert split_sentences("One two.  Three four! Five?") == ["One two.", "Three four!", "Five?"]
    assert split_sentences("  ") == []


def test_durations_cover_every_frame():
    cfg = MelConfig()
    d = corpus.durations([0.1, 0.1001, 0.5, 0.93], 80, cfg)
    assert int(d.sum()) == 80 and (d >= 0).all()


def test_log_mel_and_griffin_lim_round_trip():
    cfg = MelConfig()
    t = torch.arange(22050) / 22050
    wave = 0.5 * torch.sin(2 * torch.pi * 440 * t)
    mel = log_mel(wave, cfg)
    assert mel.shape == (80, cfg.frames(len(wave)))
    out = GriffinLim(cfg, iterations=16)(mel[None], torch.tensor([mel.shape[1]]))[0]
    assert abs(len(out) - len(wave)) < cfg.hop
    again = log_mel(out, cfg)
    peak = int(mel.mean(1).argmax())
    assert int(again.mean(1).argmax()) == peak  # the 440 Hz bin stays the loudest


def test_encoders_write_parseable_audio():
    wave = torch.linspace(-0.5, 0.5, 2205)
    for fmt in ("wav", "flac"):
        data, rate = sf.read(io.BytesIO(encode(wave, 22050, fmt)))
        assert rate == 22050 and len(data) == 2205
    assert len(encode(wave, 22050, "pcm")) == 2 * 2205


def test_tts_padding_never_changes_valid_frames():
    torch.manual_seed(0)
    net = TTS(TINY).eval()
    phone = torch.randint(1, 40, (2, 12))
    phone[1, 7:] = 0
    zero = torch.zeros_like(phone)
    with torch.no_grad():
        mu, logdur, pmask = net.encoder(phone, zero, zero)
        alone_mu, alone_dur, _ = net.encoder(phone[1:, :7], zero[1:, :7], zero[1:, :7])
        frames = torch.full((2, 12), 3) * pmask.squeeze(1).long()
        mu_f, mask = length_regulate(mu, frames)
        x = torch.randn_like(mu_f)
        c = torch.full((2,), 0.3)
        both = net.denoiser(x, c, {"mu": mu_f, "mask": mask})
        n = int(mask[1].sum())
        one = net.denoiser(x[1:, :, :n], c[1:], {"mu": mu_f[1:, :, :n], "mask": mask[1:, :, :n]})
    torch.testing.assert_close(mu[1:, :, :7], alone_mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logdur[1:, :7], alone_dur, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1:, :, :n], one, atol=1e-5, rtol=1e-5)
    assert mu_f.shape[-1] == 36 and n == 21


def test_mcd_is_zero_for_itself_and_grows_with_distortion():
    torch.manual_seed(0)
    ref = torch.randn(80, 60) - 4
    assert mcd_dtw(ref, ref) == pytest.approx(0, abs=1e-6)
    near, far = ref + 0.1 * torch.randn_like(ref), ref + 0.5 * torch.randn_like(ref)
    assert 0 < mcd_dtw(near, ref) < mcd_dtw(far, ref)
    stretched = ref.repeat_interleave(2, dim=1)  # DTW absorbs a change of tempo
    assert mcd_dtw(stretched, ref) == pytest.approx(0, abs=1e-6)


def test_speech_model_speaks_longer_for_longer_text():
    model = tiny_speech_model()
    speech = model.speech
    prepared = speech.prepare(["Hi.", "This sentence is a good deal longer than the first."])
    assert prepared.frames[1] > 2 * prepared.frames[0]
    slower = speech.prepare(["Hi."], speed=0.5)
    assert slower.frames[0] > prepared.frames[0]
    gen, cond, nfe = speech.start(prepared, "ddpm", 2, [0, 1])
    x = drive(gen, model.denoiser, cond)
    audio, seconds = speech.render(x, prepared.frames, "wav")
    data, rate = sf.read(io.BytesIO(audio))
    assert nfe == 2 and rate == 22050 and len(data) == pytest.approx(seconds * rate, abs=1)


@pytest.fixture(scope="module")
def speech_recipes(tmp_path_factory):
    """The whole recipe on a few dozen utterances: corpus, teacher, both students."""
    root = tmp_path_factory.mktemp("speech")
    data = root / "data"
    assert (
        main(["train", "speech-data", "--out", str(data), "--utterances", "30", "--test", "4"]) == 0
    )
    few = [
        "--data",
        str(data / "corpus.pt"),
        "--batch",
        "8",
        "--log-every",
        "1",
        "--max-minutes",
        "0",
    ]
    repo = root / "repo"
    teacher = repo / "speech-teacher"
    net = ["--width", "32", "--dec-width", "32", "--dec-blocks", "2"]
    args = ["train", "speech-teacher", "--out", str(teacher), "--work", str(root / "wt")]
    assert main([*args, *few, *net, "--steps", "12", "--lr", "2e-3"]) == 0
    for name in ("prodiff", "comospeech"):
        out, work = repo / f"speech-{name}", root / f"w-{name}"
        args = ["train", name, "--out", str(out), "--work", str(work), "--teacher", str(teacher)]
        assert main([*args, *few, "--steps", "3"]) == 0
    return root


def test_corpus_recipe_is_offline_and_consistent(speech_recipes):
    data = corpus.load(speech_recipes / "data" / "corpus.pt")
    assert (len(data["train"]), len(data["test"])) == (26, 4)
    train_text = {u["text"] for u in data["train"]}
    assert not train_text & {u["text"] for u in data["test"]}  # held out
    for utt in data["train"]:
        assert int(utt["durations"].sum()) == utt["mel"].shape[1]
        assert len(utt["phone"]) == len(utt["durations"]) == len(utt["stress"])


def test_speech_recipes_write_packages_that_speak(speech_recipes, capsys):
    repo = Repository(speech_recipes / "repo")
    for name, sampler, steps in (
        ("speech-teacher", "heun", 3),
        ("speech-prodiff", "ddpm", 2),
        ("speech-comospeech", "cm_multistep", 1),
    ):
        model = repo.load(name)
        assert model.spec.kind == "speech"
        prepared = model.speech.prepare(["A short test."])
        gen, cond, _ = model.speech.start(prepared, sampler, steps, [0])
        x = drive(gen, model.denoiser, cond)
        assert x.shape == prepared.mu.shape and torch.isfinite(x).all()
    card = (speech_recipes / "repo" / "speech-prodiff" / "1" / "MODEL_CARD.md").read_text()
    assert "Distilled from the teacher package" in card and "cmu_us_slt_arctic_hts" in card


def test_teacher_learns_the_prior_and_durations(speech_recipes):
    """40 steps of the teacher recipe beat its own initialisation on the training data."""
    from engines.training.speech import Data, encode_batch, make_batch, masked_mse

    out, work = speech_recipes / "t40", speech_recipes / "w40"
    data = speech_recipes / "data" / "corpus.pt"
    args = ["train", "speech-teacher", "--out", str(out), "--work", str(work), "--data"]
    args += [str(data), "--batch", "8", "--log-every", "10", "--max-minutes", "0", "--steps", "40"]
    args += ["--width", "32", "--dec-width", "32", "--dec-blocks", "2", "--lr", "3e-3"]
    assert main(args) == 0
    trained = Repository.of_folder(out).load("t40").modules[0]
    torch.manual_seed(0)
    fresh = TTS(trained.cfg)
    fresh.set_stats(trained.mel_mean, trained.mel_std)
    d = Data(str(data))
    batch = make_batch(d.utts[:16], d.mean, d.std)

    def losses(net):
        with torch.no_grad():
            mu_f, fmask, logdur, pmask = encode_batch(net, batch)
            target = torch.log1p(batch.durations.float()).unsqueeze(1)
            return masked_mse(mu_f, batch.mel, fmask), masked_mse(logdur[:, None], target, pmask)

    (prior0, dur0), (prior1, dur1) = losses(fresh), losses(trained)
    assert prior1 < 0.8 * prior0 and dur1 < 0.8 * dur0


def test_teacher_continues_from_its_package_and_refuses_another_network(speech_recipes, capsys):
    """--init: the package's float16 weights as float32, EMA equal to them (0 steps give the
    same weights back), a card that says so; a different network is one clear line."""
    from safetensors.torch import load_file

    teacher = speech_recipes / "repo" / "speech-teacher"
    data = speech_recipes / "data" / "corpus.pt"
    args = ["train", "speech-teacher", "--init", str(teacher), "--data", str(data)]
    args += ["--batch", "8", "--max-minutes", "0", "--dec-width", "32", "--dec-blocks", "2"]
    out = speech_recipes / "continued"
    run = [*args, "--out", str(out), "--work", str(speech_recipes / "wc"), "--threads", "1"]
    assert main([*run, "--width", "32", "--steps", "0"]) == 0
    before = load_file(str(teacher / "1" / "weights.safetensors"))
    after = load_file(str(out / "1" / "weights.safetensors"))
    assert before.keys() == after.keys() and before["mel_mean"].dtype == torch.float16
    assert all(torch.equal(before[k], after[k]) for k in before)
    card = (out / "1" / "MODEL_CARD.md").read_text()
    assert f"Continued from the teacher `{teacher}` v1" in card and "| init |" in card
    assert main([*run, "--width", "32", "--steps", "2", "--version", "2"]) == 0
    assert Repository.of_folder(out).load("continued", 2).spec.speech.network.width == 32
    capsys.readouterr()
    assert main([*run, "--width", "48", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert f"fewstep train speech-teacher: --init {teacher}: its network" in err
    assert "give the network flags of its model card" in err


def test_pseudo_huber_distance_ignores_padding_and_grows_linearly():
    from engines.training.speech import masked_pseudo_huber

    a = torch.zeros(2, 4, 10)
    mask = torch.ones(2, 1, 10)
    mask[1, :, 6:] = 0
    assert masked_pseudo_huber(a, a.clone(), mask) == 0
    b = a.clone()
    b[1, :, 6:] = 100.0  # padding: not counted
    assert masked_pseudo_huber(a, b, mask) == 0
    # large errors: about the root mean square error, so twice the error costs twice
    one, two = a + 1.0, a + 2.0
    d1, d2 = masked_pseudo_huber(a, one, mask), masked_pseudo_huber(a, two, mask)
    assert abs(float(d1) - 1.0) < 0.01 and abs(float(d2 / d1) - 2.0) < 0.01


def test_comospeech_recipe_takes_its_solver_grid_and_loss(speech_recipes, capsys):
    data = speech_recipes / "data" / "corpus.pt"
    teacher = speech_recipes / "repo" / "speech-teacher"
    out = speech_recipes / "cm-huber"
    args = ["train", "comospeech", "--teacher", str(teacher), "--data", str(data)]
    args += ["--out", str(out), "--work", str(speech_recipes / "w-huber"), "--batch", "8"]
    args += ["--max-minutes", "0", "--steps", "2", "--threads", "1", "--solver", "euler"]
    args += ["--grid", "4", "--loss", "pseudo-huber"]
    assert main(args) == 0
    card = (out / "1" / "MODEL_CARD.md").read_text()
    assert "Euler steps on a Karras grid of 4 points, pseudo-huber loss" in card
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*args[:-1], "l1"])
    assert exc.value.code == 2 and "invalid choice: 'l1'" in capsys.readouterr().err
    grid = args.index("--grid") + 1
    assert main([*args[:grid], "1", *args[grid + 1 :]]) == 2
    assert "the grid needs at least 2 points, got 1" in capsys.readouterr().err


@pytest.mark.parametrize("name", SPEECH)
def test_shipped_speech_models_load_speak_and_fit_the_size_limit(name):
    folder = SHIPPED / name
    weights = folder / "1" / "weights.safetensors"
    assert weights.stat().st_size < 20e6
    card = (folder / "1" / "MODEL_CARD.md").read_text()
    assert "cmu_us_slt_arctic_hts" in card and "EST-2003" in card
    if name != "speech-teacher":
        assert "Distilled from the teacher package `model_repo/speech-teacher`" in card
    model = Repository.of_folder(folder).load(name)
    s = model.spec.sampling
    short = model.speech.prepare(["Yes."])
    long = model.speech.prepare([LONG_TEXT])
    # a trained duration predictor: about 0.06 to 0.1 s per character of this text
    seconds = float(long.frames[0]) * 256 / 22050
    assert long.frames[0] > 5 * short.frames[0] and 0.04 < seconds / len(LONG_TEXT) < 0.12
    gen, cond, _ = model.speech.start(long, s.default_sampler, s.default_steps, [0])
    x = drive(gen, model.denoiser, cond)
    assert torch.isfinite(x).all() and x.abs().max() < 20


# -- a front end that never stalls, a cost known before compute, compute that stops ---------


def test_a_punctuation_only_sentence_is_a_clear_value_error():
    with pytest.raises(ValueError, match="nothing to say"):
        frontend.shared().phones("?! ...")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_stopped_festival_is_killed_and_the_next_call_starts_a_new_one():
    festival = frontend.Festival(timeout=1.0)
    try:
        before = len(festival.phones("Hello there."))
        pid = festival.pid
        os.kill(pid, signal.SIGSTOP)
        begin = time.monotonic()
        with pytest.raises(frontend.FrontendUnavailable, match="did not answer within 1 s"):
            festival.phones("Hello there.")
        took = time.monotonic() - begin
        assert 0.9 < took < 3 and _gone(pid)
        assert len(festival.phones("Hello there.")) == before and festival.pid != pid
    finally:
        festival.close()


def test_a_festival_dying_mid_request_fails_that_request_at_once():
    festival = frontend.Festival(timeout=30.0)
    try:
        festival.phones("Warm.")
        pid = festival.pid
        os.kill(pid, signal.SIGSTOP)  # holds the request in flight ...
        threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()  # ... then dies
        begin = time.monotonic()
        with pytest.raises(frontend.FrontendUnavailable, match="exited"):
            festival.phones("Hello there.")
        assert time.monotonic() - begin < 5  # EOF, not the 30 s timeout
        assert len(festival.phones("Hello there.")) > 3
    finally:
        festival.close()


def test_a_festival_that_exits_at_start_is_unavailable_not_a_crash(monkeypatch):
    monkeypatch.setattr(frontend, "festival_command", lambda: ["sh", "-c", "exit 0"])
    festival = frontend.Festival(timeout=2.0, start_timeout=2.0)
    with pytest.raises(frontend.FrontendUnavailable, match="exited"):
        festival.phones("Hello.")


def test_the_front_end_answers_threads_one_at_a_time():
    texts = ["One.", "Two words.", "Three short words.", "Four is a number."] * 3
    serial = [phones(t) for t in texts]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda t: [s.phone for s in frontend.shared().segments(t)], texts))
    assert threaded == serial


def limited(sentence_s: float, request_s: float):
    model = tiny_speech_model()
    speech = model.speech
    limits = dataclasses.replace(
        speech.spec.speech,
        max_seconds_per_sentence=sentence_s,
        max_seconds_per_request=request_s,
    )
    speech.spec = dataclasses.replace(speech.spec, speech=limits)
    return speech


def test_plan_gives_the_frames_prepare_will_make():
    speech = tiny_speech_model().speech
    sentences = ["Hi.", "This sentence is a good deal longer than the first."]
    plan = speech.plan(sentences, speed=0.5)
    prepared = speech.prepare(sentences, speed=0.5)
    assert plan.frames == prepared.frames.tolist() and plan.total == sum(plan.frames)
    assert plan.padded == 2 * max(plan.frames)
    again = speech.prepare_plan(plan)
    torch.testing.assert_close(again.mu, prepared.mu)
    assert speech.plan(sentences).total < plan.total  # speed is part of the cost


def test_abusive_speech_requests_are_refused_before_compute():
    speech = tiny_speech_model().speech  # the default limits: 40 s a sentence, 320 s padded
    long_sentence = " ".join(["The committee will meet again on Tuesday"] * 8) + "."
    begin = time.monotonic()
    with pytest.raises(TooLong, match=r"sentence 16 at speed 0.25 .* limit of 40 s"):
        speech.plan(["Go."] * 15 + [long_sentence], speed=0.25)
    with pytest.raises(TooLong, match="sentence 1 at speed 1"):
        speech.plan(["1" * 1999], speed=1.0)  # refused on its phones, before the encoder
    assert time.monotonic() - begin < 10  # Festival reading 1999 digits is most of it
    assert speech.plan(["Go."] * 15 + [long_sentence], speed=1.0).total > 0


def test_many_short_rows_padded_to_a_long_one_count_as_padded():
    speech = limited(sentence_s=10, request_s=20)
    medium = "This sentence is a good deal longer than the first one was."
    plan = speech.plan([medium], speed=1.0)
    assert speech.seconds(plan.frames[0]) < 10
    rows = max(2, int(20 // speech.seconds(plan.frames[0])) + 1)
    with pytest.raises(TooLong, match=f"the request \\({rows} sentences"):
        speech.plan(["Go."] * (rows - 1) + [medium])


class Recording:
    """A vocoder that records the mel lengths it is given."""

    def __init__(self, inner) -> None:
        self.inner, self.sample_rate, self.lengths = inner, inner.sample_rate, []

    def __call__(self, mels, frames, should_stop=lambda: False):
        self.lengths.append(mels.shape[-1])
        return self.inner(mels, frames, should_stop)


def test_each_sentence_is_vocoded_at_its_own_length():
    model = tiny_speech_model()
    speech = model.speech
    recording = Recording(GriffinLim(speech.mel, iterations=4))
    speech._vocoder = recording
    prepared = speech.prepare(["Hi.", "This sentence is a good deal longer than the first."])
    gen, cond, _ = speech.start(prepared, "ddpm", 2, [0, 1])
    waves = speech.waves(drive(gen, model.denoiser, cond), prepared.frames)
    assert recording.lengths == prepared.frames.tolist()
    assert [len(w) for w in waves] == [(n - 1) * speech.mel.hop for n in prepared.frames.tolist()]


def test_should_stop_ends_vocoding_between_iterations():
    model = tiny_speech_model()
    speech = model.speech
    prepared = speech.prepare(["Hi.", "This sentence is a good deal longer than the first."])
    gen, cond, _ = speech.start(prepared, "ddpm", 2, [0, 1])
    x = drive(gen, model.denoiser, cond)
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 5

    with pytest.raises(Stopped):
        speech.render(x, prepared.frames, "wav", should_stop)
    assert len(calls) == 6  # stopped inside the first sentence's iterations, not after all
    assert speech.render(x, prepared.frames, "wav")[1] > 0  # without it: the whole audio


def test_speech_limits_in_model_yaml_are_optional_and_checked():
    import yaml

    from engines.speech.spec import parse_speech

    raw = yaml.safe_load((SHIPPED / "speech-prodiff" / "model.yaml").read_text())["speech"]
    spec = parse_speech(raw)  # the shipped files leave the limits out: the defaults apply
    assert spec.max_seconds_per_sentence == 40 and spec.max_frames_per_sentence == 3445
    assert parse_speech({**raw, "max_seconds_per_request": 100}).max_frames_per_request == 8613
    for bad in ({"max_seconds_per_sentence": 0}, {"max_seconds_per_request": "60"}):
        with pytest.raises(ValueError, match="positive number of seconds"):
            parse_speech({**raw, **bad})
    with pytest.raises(ValueError, match="must not exceed"):
        parse_speech({**raw, "max_seconds_per_sentence": 50, "max_seconds_per_request": 40})
