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
import time

import torch
from torch import Tensor

from engines.denoisers import ConsistencyDenoiser, Denoiser, EDMDenoiser
from engines.nets.tts import TTS, frames_from_logdur, length_regulate
from engines.noise import RowNoise
from engines.samplers import INFO, SamplerGen, create, drive, nfe
from engines.speech import frontend
from engines.speech.audio import GriffinLim, MelConfig, Vocoder, encode

log = logging.getLogger("fewstep.speech")
PAUSE_S = 0.15  # silence between sentences when they are joined


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
        sigma_min = spec.sampling.sigma_min
        self.denoiser: Denoiser = (
            EDMDenoiser(tts.denoiser, 1.0)
            if s.parameterisation == "edm"
            else SpeechConsistencyDenoiser(tts.denoiser, 1.0, sigma_min)
        )

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

    @torch.no_grad()
    def prepare_ids(
        self,
        ids: list[frontend.Phones],
        speed: float = 1.0,
        device: str = "cpu",
        durations: list[Tensor] | None = None,
    ) -> Prepared:
        def pad(rows: list[Tensor]) -> Tensor:
            size = max(len(r) for r in rows)
            return torch.stack([torch.nn.functional.pad(r, (0, size - len(r))) for r in rows])

        phone, stress, final = (
            pad([getattr(p, k) for p in ids]) for k in ("phone", "stress", "final")
        )
        enc = self.tts.encoder
        mu, logdur, pmask = enc(phone.to(device), stress.to(device), final.to(device))
        if durations is None:
            frames = frames_from_logdur(logdur, pmask, speed)
        else:
            frames = pad(durations).to(device)
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
    def waves(self, x: Tensor, frames: Tensor) -> list[Tensor]:
        """Final standardised mels -> one waveform per sentence."""
        mels = self.tts.to_log_mel(x.float().cpu())
        return self.vocoder(mels, frames.cpu())

    def join(self, waves: list[Tensor]) -> Tensor:
        gap = torch.zeros(int(PAUSE_S * self.mel.sample_rate))
        parts = []
        for i, w in enumerate(waves):
            parts += [w] if i == 0 else [gap, w]
        audio = torch.cat(parts)
        peak = float(audio.abs().max()) if audio.numel() else 0.0
        return audio * (0.9 / peak) if peak > 1e-4 else audio

    def audio(self, x: Tensor, frames: Tensor) -> Tensor:
        """The whole request's waveform: sentences vocoded, joined and peak-normalised."""
        return self.join(self.waves(x, frames))

    def render(self, x: Tensor, frames: Tensor, fmt: str) -> tuple[bytes, float]:
        """Encoded audio of the whole request (sentences joined) and its seconds."""
        audio = self.audio(x, frames)
        seconds = len(audio) / self.mel.sample_rate
        if fmt == "f32":
            return audio.float().numpy().astype("<f4").tobytes(), seconds
        return encode(audio, self.mel.sample_rate, fmt), seconds

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
