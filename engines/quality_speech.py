"""`fewstep eval-speech`: WER, MCD-DTW, duration error and real-time factor on held-out
sentences, each model row with each vocoder (the neural one and Griffin-Lim), beside the
ceilings: Festival's own audio and the true mel through each vocoder.

WER: PocketSphinx (engines.speech.asr) on the final audio against the sentence's text.

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
from engines.reports import out_file
from engines.repository import Repository
from engines.samplers import drive
from engines.speech import corpus, frontend
from engines.speech.asr import Recognizer, wer
from engines.speech.audio import Vocoder, encode, log_mel

CEPSTRA = 24
RTF_SENTENCES = 15  # the real-time factor is the median over this many sentences
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
    vocoder: str
    nfe: int | None
    mcd_audio: float
    mcd_mel: float | None
    wer: float | None
    rtfs: list[float]  # whole-request seconds / audio seconds, per sentence

    @property
    def rtf(self) -> float | None:
        """Median real-time factor over the first RTF_SENTENCES sentences."""
        if not self.rtfs:
            return None
        first = sorted(self.rtfs[:RTF_SENTENCES])
        return first[len(first) // 2]


def held_out(path: str, limit: int) -> list[dict]:
    return corpus.load(path)["test"][: limit or None]


def synthesise(model, utt: dict, sampler: str | None, steps: int, seed: int, vocoder: Vocoder):
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
    wave = speech.audio(x, frames, vocoder=vocoder)
    encode(wave, speech.mel.sample_rate, "wav")  # the response's encoding is part of it
    seconds = time.perf_counter() - begin
    mel = speech.tts.to_log_mel(x.float())[0, :, : int(frames[0])]
    return mel, wave, seconds


def _wer(asr: Recognizer | None, utts: list[dict], waves: list[Tensor], rate: int):
    if asr is None:
        return None
    return wer([u["text"] for u in utts], [asr(w, rate) for w in waves])


def evaluate(model, utts, name, sampler, steps, seed, vocoder, vocoder_name, asr) -> Row:
    cfg = model.speech.mel
    synthesise(model, utts[0], sampler, steps, seed, vocoder)  # untimed: first-call allocations
    audio, mel, rtfs, waves = [], [], [], []
    for utt in utts:
        gen_mel, wave, secs = synthesise(model, utt, sampler, steps, seed, vocoder)
        ref = utt["mel"].float()
        mel.append(mcd_dtw(gen_mel, ref))
        audio.append(mcd_dtw(log_mel(wave, cfg), ref))
        rtfs.append(secs / (len(wave) / cfg.sample_rate))
        waves.append(wave)
    nfe = 0 if sampler is None else len(model.spec.grid(steps)) - 1
    if sampler == "heun":
        nfe = 2 * steps - 1
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    score = _wer(asr, utts, waves, cfg.sample_rate)
    return Row(name, vocoder_name, nfe, mean(audio), mean(mel), score, rtfs)


def duration_error(model, utts: list[dict]) -> tuple[float, float]:
    """Mean absolute error of predicted frames per phone (frames, ms) with the true phones."""
    speech = model.speech
    errors = []
    for utt in utts:
        ids = frontend.Phones(utt["phone"], utt["stress"], utt["final"])
        with torch.no_grad():
            _, logdur, _mask = speech.tts.encoder(
                ids.phone[None], ids.stress[None], ids.final[None]
            )
        frames = torch.round(torch.expm1(logdur[0]).clamp(min=0)).clamp(min=1)
        errors.append((frames - utt["durations"].float()).abs())
    err = float(torch.cat(errors).mean())
    return err, err * speech.mel.hop / speech.mel.sample_rate * 1000


def vocoder_row(vocoder: Vocoder, name: str, utts: list[dict], cfg, asr) -> Row:
    """The reference mel through a vocoder: that vocoder's ceiling."""
    scores, waves, rtfs = [], [], []
    for utt in utts:
        ref = utt["mel"].float()
        begin = time.perf_counter()
        wave = vocoder(ref[None], torch.tensor([ref.shape[1]]))[0]
        rtfs.append((time.perf_counter() - begin) / (len(wave) / cfg.sample_rate))
        scores.append(mcd_dtw(log_mel(wave, cfg), ref))
        waves.append(wave)
    score = _wer(asr, utts, waves, cfg.sample_rate)
    mcd = sum(scores) / len(scores)
    return Row("teacher voice's mel (vocoder ceiling)", name, None, mcd, None, score, rtfs)


def festival_row(utts: list[dict], folder: Path, cfg, asr) -> Row:
    """Festival's own audio of the held-out sentences (corpus wav/NNNNN.wav, test first):
    the ceiling of every row."""
    import soundfile as sf

    scores, waves = [], []
    for i, utt in enumerate(utts):
        samples, rate = sf.read(folder / f"{i:05d}.wav", dtype="float32")
        wave = torch.from_numpy(samples)
        scores.append(mcd_dtw(log_mel(wave, cfg), utt["mel"].float()))
        waves.append(wave)
    score = _wer(asr, utts, waves, rate)
    return Row(
        "Festival's own audio (ceiling)", "-", None, sum(scores) / len(scores), None, score, []
    )


# (key, label, model, sampler (None: prior), steps)
ROWS = (
    ("prior", "prior mu alone (floor)", "speech-teacher", None, 1),
    ("teacher-ddpm1", "teacher, 1 step x0 (ddpm)", "speech-teacher", "ddpm", 1),
    ("teacher-ddpm2", "teacher, 2 steps (ddpm)", "speech-teacher", "ddpm", 2),
    ("teacher-heun10", "teacher, Heun 10 steps", "speech-teacher", "heun", 10),
    ("teacher-dpmpp4", "teacher, DPM-Solver++(2M) 4 steps", "speech-teacher", "dpmpp_2m", 4),
    ("prodiff2", "ProDiff student, 2 steps (ddpm)", "speech-prodiff", "ddpm", 2),
    ("comospeech1", "CoMoSpeech student, 1 step", "speech-comospeech", "cm_multistep", 1),
    ("comospeech2", "CoMoSpeech student, 2 steps", "speech-comospeech", "cm_multistep", 2),
)
REFERENCES = ("festival", "vocoder")


def _cell(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[Row], dur: tuple[float, float], n: int, hardware: str) -> str:
    lines = [
        "| model / sampler | vocoder | NFE | WER | MCD-DTW audio (dB) | MCD-DTW mel (dB) "
        f"| RTF (median of {min(n, RTF_SENTENCES)}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.vocoder} | {_cell(r.nfe, 'd')} | {_cell(r.wer, '.3f')} "
            f"| {r.mcd_audio:.2f} | {_cell(r.mcd_mel, '.2f')} | {_cell(r.rtf, '.3f')} |"
        )
    return "\n".join(lines) + (
        f"\n\n{n} held-out sentences (never trained on), seed 0, one request at a time, "
        f"{hardware}. WER: PocketSphinx 5 (bundled US-English model) at 16 kHz against "
        "the sentence text. RTF: whole request (front end, encoder, sampler, vocoder, WAV) "
        f"over the audio's length. Duration predictor: {dur[0]:.2f} frames ({dur[1]:.1f} ms) "
        "mean absolute error per phone against Festival's durations.\n"
    )


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("eval-speech", help="speech: WER, MCD-DTW, duration error, RTF table")
    p.add_argument("--data", default="runs/speech-data/corpus.pt", help="corpus with test split")
    p.add_argument("--model-repo", default="model_repo")
    p.add_argument("--n", type=int, default=40, help="held-out sentences (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--vocoders",
        default="slt-vocos,griffin-lim",
        help="vocoders to compare, comma-separated (default slt-vocos,griffin-lim)",
    )
    keys = ",".join(k for k, *_ in ROWS)
    p.add_argument(
        "--rows",
        default=f"{keys},{','.join(REFERENCES)}",
        help=f"rows to run ({keys},festival,vocoder)",
    )
    p.add_argument("--no-wer", action="store_true", help="skip the recogniser (faster)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
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


def _label(model, label: str, sampler: str | None, steps: int) -> str:
    s = model.spec.sampling
    return (
        f"{label} (default)" if (sampler, steps) == (s.default_sampler, s.default_steps) else label
    )


def main(args: argparse.Namespace) -> int:
    wanted = [k.strip() for k in args.rows.split(",") if k.strip()]
    known = [k for k, *_ in ROWS] + list(REFERENCES)
    if unknown := [k for k in wanted if k not in known]:
        print(f"fewstep: unknown rows {unknown}; the rows are {known}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        out = out_file(args.out)
        repo = Repository(args.model_repo)
        utts = held_out(args.data, args.n)
        names = [v.strip() for v in args.vocoders.split(",") if v.strip()]
        vocoders = {v: repo.vocoder(v, threads=args.threads or None) for v in names}
        asr = None if args.no_wer else Recognizer()
    except (OSError, ValueError, RuntimeError) as err:
        print(f"fewstep: {err}", file=sys.stderr)
        return 2
    models, rows = {}, []
    cfg = None
    for key, label, name, sampler, steps in ROWS:
        if key not in wanted:
            continue
        if name not in repo.names():
            print(f"skipping {label}: no model {name}", file=sys.stderr)
            continue
        model = models.setdefault(name, repo.load(name))
        model.warmup()
        cfg = model.speech.mel
        for vname, vocoder in vocoders.items():
            row = evaluate(
                model,
                utts,
                _label(model, label, sampler, steps),
                sampler,
                steps,
                args.seed,
                vocoder,
                vname,
                asr,
            )
            print(
                f"{row.name} + {vname}: WER {_cell(row.wer, '.3f')} MCD audio "
                f"{row.mcd_audio:.2f} mel {row.mcd_mel:.2f} RTF {row.rtf:.3f}",
                flush=True,
            )
            rows.append(row)
    teacher = models.get("speech-teacher") or repo.load("speech-teacher")
    cfg = teacher.speech.mel
    if "vocoder" in wanted:
        rows += [vocoder_row(v, n, utts, cfg, asr) for n, v in vocoders.items()]
    if "festival" in wanted:
        rows.append(festival_row(utts, Path(args.data).parent / "wav", cfg, asr))
    text = table(rows, duration_error(teacher, utts), len(utts), describe_host())
    print(text)
    if out is not None:
        out.write_text(text)
    if args.cards:
        write_cards(repo, list(models), text)
    return 0
