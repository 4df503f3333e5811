"""A loaded speech model's text -> audio path around the denoiser the samplers drive.

prepare: text -> Festival phones -> encoder -> durations (scaled by speed) -> mu per frame,
padded and masked across the request's sentences. The sampler then runs on standardised
mels of shape (sentences, n_mels, frames) with cond {"mu", "mask"}; `render` de-standardises
the result, vocodes each sentence and joins them into one audio stream.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections import OrderedDict

import torch
from torch import Tensor

from engines.denoisers import ConsistencyDenoiser, Denoiser, EDMDenoiser
from engines.nets.tts import TTS, frames_from_logdur, length_regulate
from engines.noise import RowNoise
from engines.samplers import INFO, SamplerGen, create, drive, nfe
from engines.speech import frontend
from engines.speech.audio import GriffinLim, MelConfig, StopCheck, Stopped, Vocoder, encode, never

log = logging.getLogger("fewstep.speech")
PAUSE_S = 0.15  # silence between sentences when they are joined
PLAN_CACHE = 256  # checked plans kept (small tensors: phone ids and durations)


class SpeechConsistencyDenoiser(ConsistencyDenoiser):
    """Consistency boundary scalings with EDM's c_noise (log sigma / 4), so that a student
    starting from its EDM teacher's weights sees the noise embedding it was trained with."""

    def c_noise(self, sigma: Tensor) -> Tensor:
        return sigma.log() / 4


def split_sentences(text: str) -> list[str]:
    """Sentences of text: split after . ! ? followed by space and an upper-case letter or
    digit (so "Dr. Smith" stays whole only when the next word is lower case; Festival reads
    each part correctly either way)."""
    text = " ".join(text.split())
    parts = re.split(r"(?<=[.!?;])\s+(?=[\"'(A-Z0-9])", text)
    return [p for p in parts if p.strip()]


class TooLong(ValueError):
    """A request whose audio would pass the model's limits: refused before any compute."""


def _refuse(spec, what: str, frames: int, limit: int, advice: str) -> TooLong:
    s = spec.speech
    seconds = frames * s.hop / s.sample_rate
    return TooLong(
        f"{what} would be {seconds:.1f} s of audio, over model {spec.name}'s limit of "
        f"{limit * s.hop / s.sample_rate:.0f} s; {advice}"
    )


def check_frames(spec, lengths: list[int], speed: float, first: int = 1) -> None:
    """Raise TooLong if a sentence of `lengths` frames (numbered from `first`), or the
    request's padded batch (rows x its longest), passes the model's limits."""
    s = spec.speech
    for i, n in enumerate(lengths):
        if n > s.max_frames_per_sentence:
            raise _refuse(
                spec,
                f"sentence {i + first} at speed {speed:g}",
                n,
                s.max_frames_per_sentence,
                "shorten it, split it into sentences, or raise speed",
            )
    if len(lengths) * max(lengths) > s.max_frames_per_request:
        raise _refuse(
            spec,
            f"the request ({len(lengths)} sentences, each synthesised as long as the longest)",
            len(lengths) * max(lengths),
            s.max_frames_per_request,
            "send the longest sentences in requests of their own, or shorten the text",
        )


def plan_phones(spec, sentences: list[str], speed: float = 1.0, festival=None):
    """Each sentence's phones, checked with the bound the front end alone gives (every phone
    takes at least one frame): what a process without the model's weights can check.
    Raises as Speech.plan does."""
    if not sentences:
        raise ValueError("there is no text to speak; send at least one sentence")
    festival = festival or frontend.shared()
    ids = [festival.phones(t) for t in sentences]
    check_frames(spec, [len(p) for p in ids], speed)
    return ids


def _pad(rows: list[Tensor]) -> Tensor:
    size = max(len(r) for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, size - len(r))) for r in rows])


@dataclasses.dataclass
class Plan:
    """A request's cost, known after the front end and the duration predictor and before
    the sampler runs: frames per sentence at the request's speed."""

    ids: list[frontend.Phones]
    durations: list[Tensor]  # frames per phone of each sentence, speed included
    frames: list[int]  # frames of each sentence

    @property
    def total(self) -> int:
        """Frames of audio the request makes."""
        return sum(self.frames)

    @property
    def padded(self) -> int:
        """Frames the sampler runs: every row padded to the longest."""
        return len(self.frames) * max(self.frames)


@dataclasses.dataclass
class Prepared:
    mu: Tensor  # (B, n_mels, T) standardised prior mean per frame
    mask: Tensor  # (B, 1, T)
    frames: Tensor  # (B,) frames of each sentence
    phones: int

    def cond(self) -> dict[str, Tensor]:
        return {"mu": self.mu, "mask": self.mask}


class Speech:
    """Front end, encoder, denoiser wrapper and vocoder of one speech model version."""

    def __init__(self, spec, tts: TTS, vocoder: Vocoder | None = None, festival=None) -> None:
        self.spec, self.tts = spec, tts
        s = spec.speech
        self.mel = MelConfig(sample_rate=s.sample_rate, hop=s.hop, n_mels=s.network.n_mels)
        self._vocoder = vocoder
        self.festival = festival or frontend.shared()
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()
        self._plans_lock = threading.Lock()
        sigma_min = spec.sampling.sigma_min
        self.denoiser: Denoiser = (
            EDMDenoiser(tts.denoiser, 1.0)
            if s.parameterisation == "edm"
            else SpeechConsistencyDenoiser(tts.denoiser, 1.0, sigma_min)
        )

    def seconds(self, frames: int) -> float:
        return frames * self.mel.hop / self.mel.sample_rate

    def _durations(self, ids: frontend.Phones, speed: float) -> Tensor:
        """Frames per phone of one sentence at `speed` (the encoder's duration predictor)."""
        device = self.tts.mel_mean.device
        phone, stress, final = (
            getattr(ids, k)[None].to(device) for k in ("phone", "stress", "final")
        )
        _, logdur, pmask = self.tts.encoder(phone, stress, final)
        return frames_from_logdur(logdur, pmask, speed)[0].cpu()

    @torch.no_grad()
    def plan(self, sentences: list[str], speed: float = 1.0) -> Plan:
        """The request's frames, checked against the model's limits before any sampling.

        Raises TooLong (a ValueError) past the limits, ValueError for a sentence with
        nothing to say, frontend.FrontendUnavailable when Festival hung or died (retry),
        frontend.FrontendError when Festival is missing. Thread-safe; blocks on Festival,
        so call it off the event loop. The last PLAN_CACHE plans are kept, so the worker
        starting a request admission planned does not ask Festival again."""
        key = (tuple(sentences), float(speed))
        with self._plans_lock:
            if key in self._plans:
                self._plans.move_to_end(key)
                return self._plans[key]
        # every phone takes at least one frame: refuse what is too long before the encoder
        # (its attention is quadratic in phones)
        ids = plan_phones(self.spec, sentences, speed, self.festival)
        # each sentence alone, longest first: no row pays for padding to the longest (the
        # encoder's attention is quadratic), a sentence over the limit is refused before the
        # rest are encoded, and a sentence's durations never depend on its neighbours
        durations: list[Tensor | None] = [None] * len(ids)
        for i in sorted(range(len(ids)), key=lambda i: -len(ids[i])):
            durations[i] = self._durations(ids[i], speed)
            check_frames(self.spec, [int(durations[i].sum())], speed, first=i + 1)
        plan = Plan(ids, durations, [int(d.sum()) for d in durations])
        check_frames(self.spec, plan.frames, speed)
        with self._plans_lock:  # admission plans, the worker starts: one trip to Festival
            self._plans[key] = plan
            while len(self._plans) > PLAN_CACHE:
                self._plans.popitem(last=False)
        return plan

    @torch.no_grad()
    def prepare(
        self,
        sentences: list[str],
        speed: float = 1.0,
        device: str = "cpu",
        durations: list[Tensor] | None = None,
    ) -> Prepared:
        """Encode sentences; frames from the duration predictor (or given durations)."""
        ids = [self.festival.phones(t) for t in sentences]
        return self.prepare_ids(ids, speed, device, durations)

    def prepare_plan(self, plan: Plan, device: str = "cpu") -> Prepared:
        """The sampler's inputs for a checked plan (no second trip to Festival)."""
        return self.prepare_ids(plan.ids, 1.0, device, plan.durations)

    @torch.no_grad()
    def prepare_ids(
        self,
        ids: list[frontend.Phones],
        speed: float = 1.0,
        device: str = "cpu",
        durations: list[Tensor] | None = None,
    ) -> Prepared:
        phone, stress, final = (
            _pad([getattr(p, k) for p in ids]) for k in ("phone", "stress", "final")
        )
        enc = self.tts.encoder
        mu, logdur, pmask = enc(phone.to(device), stress.to(device), final.to(device))
        if durations is None:
            frames = frames_from_logdur(logdur, pmask, speed)
        else:
            frames = _pad(durations).to(device)
        mu_f, mask = length_regulate(mu, frames)
        return Prepared(mu_f, mask, frames.sum(1), int(pmask.sum()))

    def start(
        self,
        prepared: Prepared,
        sampler: str,
        steps: int,
        seeds: list[int],
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> tuple[SamplerGen, dict[str, Tensor], int]:
        """The sampler generator over the prepared mels, its cond, and its NFE."""
        sigmas = self.spec.grid(steps)
        noise = RowNoise(seeds)
        shape = (len(seeds), *prepared.mu.shape[1:])
        x = noise.randn(shape, dtype=dtype, device=device) * float(sigmas[0])
        cond = {k: v.to(device=device, dtype=dtype) for k, v in prepared.cond().items()}
        return create(sampler, x, sigmas, noise), cond, nfe(sampler, sigmas)

    @property
    def vocoder(self) -> Vocoder:
        if self._vocoder is None:  # built on first use: it needs librosa's filterbank
            self._vocoder = GriffinLim(self.mel)
        return self._vocoder

    @torch.no_grad()
    def waves(
        self,
        x: Tensor,
        frames: Tensor,
        should_stop: StopCheck = never,
        vocoder: Vocoder | None = None,
    ) -> list[Tensor]:
        """Final standardised mels -> one waveform per sentence. A batched (neural) vocoder
        takes the padded mels in one pass, each row masked and trimmed to its length;
        Griffin-Lim vocodes each sentence at its own length (not padded to the longest).
        Raises Stopped once should_stop() is true (checked between sentences and between
        vocoder iterations). `vocoder` replaces the model's own (evaluations compare them)."""
        vocoder = vocoder or self.vocoder
        mels = self.tts.to_log_mel(x.float().cpu())
        if getattr(vocoder, "batched", False):
            return vocoder(mels, frames.cpu().clamp(min=1), should_stop)
        out = []
        for i, n in enumerate(frames.cpu().tolist()):
            if should_stop():
                raise Stopped("vocoding stopped: the job was canceled or is past its deadline")
            n = max(int(n), 1)
            out += vocoder(mels[i : i + 1, :, :n], torch.tensor([n]), should_stop)
        return out

    def join(self, waves: list[Tensor]) -> Tensor:
        gap = torch.zeros(int(PAUSE_S * self.mel.sample_rate))
        parts = []
        for i, w in enumerate(waves):
            parts += [w] if i == 0 else [gap, w]
        audio = torch.cat(parts)
        peak = float(audio.abs().max()) if audio.numel() else 0.0
        return audio * (0.9 / peak) if peak > 1e-4 else audio

    def audio(
        self,
        x: Tensor,
        frames: Tensor,
        should_stop: StopCheck = never,
        vocoder: Vocoder | None = None,
    ) -> Tensor:
        """The whole request's waveform: sentences vocoded, joined and peak-normalised."""
        return self.join(self.waves(x, frames, should_stop, vocoder))

    def render(
        self, x: Tensor, frames: Tensor, fmt: str, should_stop: StopCheck = never
    ) -> tuple[bytes, float]:
        """Encoded audio of the whole request (sentences joined) and its seconds. Raises
        audio.Stopped as soon as should_stop() is true (a canceled or late job)."""
        return self._encoded(self.audio(x, frames, should_stop), fmt)

    def _encoded(self, audio: Tensor, fmt: str) -> tuple[bytes, float]:
        seconds = len(audio) / self.mel.sample_rate
        if fmt == "f32":
            return audio.float().numpy().astype("<f4").tobytes(), seconds
        return encode(audio, self.mel.sample_rate, fmt), seconds

    @torch.no_grad()
    def render_many(
        self,
        xs: list[Tensor],
        frames: list[Tensor],
        fmts: list[str],
        stops: list[StopCheck],
    ) -> list[tuple[bytes, float] | Exception]:
        """`render` for several requests, their sentences in one `waves` call, so one pass of
        the (batched) vocoder: zero-padded to the longest, each row trimmed to its frames, so
        each request gets the samples it gets alone. A request whose stop check is already
        true gets audio.Stopped and no rows in the pass."""
        out: list[tuple[bytes, float] | Exception] = [
            Stopped("vocoding stopped: the job was canceled or is past its deadline") for _ in stops
        ]
        live = [i for i, stop in enumerate(stops) if not stop()]
        if not live:
            return out
        longest = max(xs[i].shape[-1] for i in live)
        padded = torch.cat(
            [torch.nn.functional.pad(xs[i], (0, longest - xs[i].shape[-1])) for i in live]
        )
        waves = self.waves(padded, torch.cat([frames[i] for i in live]))
        first = 0
        for i in live:
            audio = self.join(waves[first : first + len(xs[i])])
            first += len(xs[i])
            try:
                out[i] = self._encoded(audio, fmts[i])
            except Exception as exc:  # that request's encoding alone fails
                out[i] = exc
        return out

    def warmup(self) -> float:
        """Start the front end and run each stage once (the sampler at its fewest steps)."""
        begin = time.perf_counter()
        try:
            prepared = self.prepare(["Warm up the model."])
        except frontend.FrontendError as err:  # served anyway: each request says what is missing
            log.warning("speech model %s: %s", self.spec.name, err)
            prepared = self.prepare_ids([frontend.Phones(*(torch.ones(3, dtype=torch.long),) * 3)])
        sampler = self.spec.sampling.default_sampler
        gen, cond, _ = self.start(prepared, sampler, INFO[sampler].min_steps({}), [0])
        x = drive(gen, self.denoiser, cond)
        self.render(x, prepared.frames, "wav")
        return time.perf_counter() - begin
