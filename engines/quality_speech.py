"""`fewstep eval-speech`: MCD-DTW, duration error and real-time factor on held-out sentences.

MCD here is this project's own variant (compare rows, not papers): the cepstrum of the
80-bin natural-log mel (DCT-II / 80, so log-mel = c0 + 2 sum c_d cos(.)), c1..c24, in dB:
(10 / ln 10) sqrt(2 sum_d (c_d - c'_d)^2). DTW aligns all frames; the mean is over the
path's points at reference frames within 40 dB of the loudest.
"audio" columns take the log-mel of the final waveform (vocoder included) against the
teacher voice's own audio; "mel" columns the model's mel before the vocoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from engines.hardware import describe_host
from engines.noise import row_seeds
from engines.repository import Repository
from engines.samplers import drive
from engines.speech import corpus, frontend
from engines.speech.audio import encode, log_mel

CEPSTRA = 24
DB = 10 / math.log(10) * math.sqrt(2)


def cepstra(log_mel_frames: Tensor) -> Tensor:
    """(n_mels, T) natural-log mel -> (T, CEPSTRA) cosine-series cepstra c1..c24."""
    n = log_mel_frames.shape[0]
    k = torch.arange(n, dtype=torch.float64)
    basis = torch.cos(math.pi / n * (k[None, :] + 0.5) * torch.arange(CEPSTRA + 1)[:, None])
    c = basis.to(log_mel_frames.dtype) @ log_mel_frames  # (CEPSTRA + 1, T)
    return (c[1:] / n).T  # log-spectrum = c0 + 2 sum_d c_d cos(...), the cepstrum's scale


def voiced(ref: Tensor) -> Tensor:
    """Frames of a log-mel within 40 dB of its loudest frame."""
    energy = torch.logsumexp(2 * ref, dim=0)  # log power per frame
    return energy >= energy.max() - 40 / (10 / math.log(10))


def mcd_dtw(gen: Tensor, ref: Tensor) -> float:
    """MCD in dB of a generated log-mel against a reference, DTW-aligned."""
    import librosa

    cost = torch.cdist(cepstra(gen.double()), cepstra(ref.double()))
    _, path = librosa.sequence.dtw(C=cost.numpy())
    path = torch.from_numpy(path.copy())
    keep = voiced(ref)[path[:, 1]]  # score the path where the reference is not silent
    return float(DB * cost[path[keep, 0], path[keep, 1]].mean())


@dataclasses.dataclass
class Row:
    name: str
    nfe: int
    mcd_audio: float
    mcd_mel: float
    seconds: float  # whole-request time: front end, encoder, sampler, vocoder, WAV
    audio_seconds: float

    @property
    def rtf(self) -> float:
        return self.seconds / self.audio_seconds


def held_out(path: str, limit: int) -> list[dict]:
    return corpus.load(path)["test"][: limit or None]


def synthesise(model, utt: dict, sampler: str | None, steps: int, seed: int):
    """One whole request for utt's text: (log-mel before vocoder, wave, seconds)."""
    speech = model.speech
    begin = time.perf_counter()
    prepared = speech.prepare([utt["text"]])
    if sampler is None:  # the prior mean alone: the regression floor
        x = prepared.mu
    else:
        gen, cond, _ = speech.start(prepared, sampler, steps, row_seeds(seed, 1))
        with torch.inference_mode():
            x = drive(gen, model.denoiser, cond)
    frames = prepared.frames
    wave = speech.audio(x, frames)
    encode(wave, speech.mel.sample_rate, "wav")  # the response's encoding is part of it
    seconds = time.perf_counter() - begin
    mel = speech.tts.to_log_mel(x.float())[0, :, : int(frames[0])]
    return mel, wave, seconds


def evaluate(model, utts: list[dict], name: str, sampler, steps: int, seed: int) -> Row:
    cfg = model.speech.mel
    synthesise(model, utts[0], sampler, steps, seed)  # untimed: first-call allocations
    audio, mel, seconds, dur = [], [], 0.0, 0.0
    for utt in utts:
        gen_mel, wave, secs = synthesise(model, utt, sampler, steps, seed)
        ref = utt["mel"].float()
        mel.append(mcd_dtw(gen_mel, ref))
        audio.append(mcd_dtw(log_mel(wave, cfg), ref))
        seconds += secs
        dur += len(wave) / cfg.sample_rate
    nfe = 0 if sampler is None else len(model.spec.grid(steps)) - 1
    if sampler == "heun":
        nfe = 2 * steps - 1
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return Row(name, nfe, mean(audio), mean(mel), seconds, dur)


def duration_error(model, utts: list[dict]) -> tuple[float, float]:
    """Mean absolute error of predicted frames per phone (frames, ms) with the true phones."""
    speech = model.speech
    errors = []
    for utt in utts:
        ids = frontend.Phones(utt["phone"], utt["stress"], utt["final"])
        with torch.no_grad():
            prepared = speech.prepare_ids([ids])
            _, logdur, _mask = speech.tts.encoder(
                ids.phone[None], ids.stress[None], ids.final[None]
            )
        del prepared
        frames = torch.round(torch.expm1(logdur[0]).clamp(min=0)).clamp(min=1)
        errors.append((frames - utt["durations"].float()).abs())
    err = float(torch.cat(errors).mean())
    return err, err * speech.mel.hop / speech.mel.sample_rate * 1000


def vocoder_row(model, utts: list[dict]) -> Row:
    """The reference mel through the vocoder: the floor of the audio column."""
    speech = model.speech
    scores, dur, seconds = [], 0.0, 0.0
    for utt in utts:
        ref = utt["mel"].float()
        begin = time.perf_counter()
        wave = speech.vocoder(ref[None], torch.tensor([ref.shape[1]]))[0]
        seconds += time.perf_counter() - begin
        scores.append(mcd_dtw(log_mel(wave, speech.mel), ref))
        dur += len(wave) / speech.mel.sample_rate
    return Row(
        "teacher voice's mel + Griffin-Lim (vocoder floor)",
        0,
        sum(scores) / len(scores),
        0.0,
        seconds,
        dur,
    )


def three_second(model, sampler, steps: int, repeats: int = 5) -> tuple[float, float]:
    """Median whole-request seconds and RTF for a sentence of about 3 s."""
    text = "The quick brown fox jumps over the lazy dog."  # 3.1 s with the shipped models
    utt = {"text": text}
    times, audio = [], 0.0
    for _ in range(repeats):
        _, wave, secs = synthesise(model, utt, sampler, steps, 0)
        times.append(secs)
        audio = len(wave) / model.speech.mel.sample_rate
    med = sorted(times)[len(times) // 2]
    return med, med / audio


ROWS = (
    # (label, model, sampler (None: prior), steps)
    ("prior mu alone (floor)", "speech-teacher", None, 1),
    ("teacher, 1 step x0 (ddpm)", "speech-teacher", "ddpm", 1),
    ("teacher, 2 steps (ddpm)", "speech-teacher", "ddpm", 2),
    ("teacher, Heun 10 steps", "speech-teacher", "heun", 10),
    ("ProDiff student, 2 steps (ddpm)", "speech-prodiff", "ddpm", 2),
    ("CoMoSpeech student, 1 step (cm_multistep)", "speech-comospeech", "cm_multistep", 1),
    ("CoMoSpeech student, 2 steps (cm_multistep)", "speech-comospeech", "cm_multistep", 2),
)


def table(
    rows: list[Row],
    rtf3: dict[str, tuple[float, float]],
    dur: tuple[float, float],
    n: int,
    hardware: str,
) -> str:
    lines = [
        "| model / sampler | NFE | MCD-DTW audio (dB) | MCD-DTW mel (dB) | RTF (held-out) "
        "| 3 s sentence: s / RTF |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mel = f"{r.mcd_mel:.2f}" if r.mcd_mel else "-"
        three = rtf3.get(r.name)
        three_text = f"{three[0]:.3f} / {three[1]:.3f}" if three else "-"
        lines.append(
            f"| {r.name} | {r.nfe} | {r.mcd_audio:.2f} | {mel} | {r.rtf:.3f} | {three_text} |"
        )
    return "\n".join(lines) + (
        f"\n\n{n} held-out sentences (never trained on), seed 0, one request at a time, "
        f"{hardware}. Duration predictor: {dur[0]:.2f} frames ({dur[1]:.1f} ms) mean "
        "absolute error per phone against Festival's durations.\n"
    )


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("eval-speech", help="speech: MCD-DTW, duration error, RTF table")
    p.add_argument("--data", default="runs/speech-data/corpus.pt", help="corpus with test split")
    p.add_argument("--model-repo", default="model_repo")
    p.add_argument("--n", type=int, default=40, help="held-out sentences (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument(
        "--cards", action="store_true", help="also put the table into each model's MODEL_CARD.md"
    )
    p.set_defaults(run=main)


def write_cards(repo: Repository, names: list[str], text: str) -> None:
    """Replace the Quality section of each evaluated model's card with the table."""
    for name in names:
        spec = repo.spec(name)
        path = Path(repo.root) / name / str(spec.version) / "MODEL_CARD.md"
        card = path.read_text()
        head = card.split("## Quality")[0]
        path.write_text(f"{head}## Quality\n\nMeasured by `fewstep eval-speech`:\n\n{text}")


def main(args: argparse.Namespace) -> int:
    try:
        repo = Repository(args.model_repo)
        utts = held_out(args.data, args.n)
    except (OSError, ValueError) as err:
        print(f"fewstep: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(torch.get_num_threads())
    models = {}
    rows, rtf3 = [], {}
    for label, name, sampler, steps in ROWS:
        if name not in repo.names():
            print(f"skipping {label}: no model {name}", file=sys.stderr)
            continue
        model = models.setdefault(name, repo.load(name))
        model.warmup()
        row = evaluate(model, utts, label, sampler, steps, args.seed)
        rtf3[label] = three_second(model, sampler, steps)
        print(
            f"{label}: MCD audio {row.mcd_audio:.2f} mel {row.mcd_mel:.2f} RTF {row.rtf:.3f}",
            flush=True,
        )
        rows.append(row)
    teacher = models.get("speech-teacher") or next(iter(models.values()))
    rows.append(vocoder_row(teacher, utts))
    text = table(rows, rtf3, duration_error(teacher, utts), len(utts), describe_host())
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.cards:
        write_cards(repo, list(models), text)
    return 0
