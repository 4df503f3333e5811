"""`fewstep train vocoder`: the Vocos-style vocoder on the speech corpus' own waveforms.

Each step takes a seeded batch of random segments (`--segment` frames) of the training
utterances: the input is the corpus' log-mel of the whole utterance sliced at the segment
(what serving passes), the target the waveform under it. Loss: multi-resolution STFT
(spectral convergence + log-magnitude L1 at 512/1024/2048-point FFTs) plus the L1 distance
of the output's log-mel. AdamW with warm-up, gradients clipped, an EMA copy is packaged.
The package is model_repo/_vocoders/<name>/ (outside the served models: the repository
skips folders that start with '_'): vocoder.yaml, <version>/weights.safetensors and a card.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import torch
import yaml
from torch import Tensor
from torch.nn import functional as F

from engines.nets import config_to_dict
from engines.nets.vocoder import VocoderConfig, Vocos
from engines.speech import corpus
from engines.speech.audio import MelConfig, log_mel
from engines.training import common

RESOLUTIONS = ((512, 128), (1024, 256), (2048, 512))  # (n_fft, hop) of the STFT loss


@dataclasses.dataclass(frozen=True)
class VocoderSettings:
    segment: int = 64  # frames per training segment (64 * 256 samples = 0.74 s)
    mel_weight: float = 1.0  # log-mel L1 beside the multi-resolution STFT loss
    ema: float = 0.999


@dataclasses.dataclass
class Waves:
    """The training utterances: log-mels (float16) and their waveforms (float32)."""

    mels: list[Tensor]
    waves: list[Tensor]
    seconds: float

    def __len__(self) -> int:
        return len(self.mels)


def load_waves(path: str, limit: int, segment: int, log: common.Log) -> Waves:
    """corpus.pt's training split and the WAVs beside it (wav/NNNNN.wav: the test
    sentences come first), utterances shorter than a segment left out."""
    import soundfile as sf

    data = corpus.load(path)
    folder = Path(path).parent / "wav"
    skip = len(data["test"])
    cfg = MelConfig(**data["mel_config"])
    mels, waves = [], []
    train = data["train"][: limit or None]
    for j, utt in enumerate(train):
        file = folder / f"{skip + j:05d}.wav"
        if not file.is_file():
            raise common.RecipeError(f"{file} is missing: rebuild with `fewstep train speech-data`")
        wave, rate = sf.read(file, dtype="float32")
        if rate != cfg.sample_rate or cfg.frames(len(wave)) != utt["mel"].shape[1]:
            raise common.RecipeError(f"{file} does not match corpus.pt's mel of utterance {j}")
        if utt["mel"].shape[1] > segment:
            mels.append(utt["mel"])
            waves.append(torch.from_numpy(wave))
        if (j + 1) % 500 == 0:
            log(f"read {j + 1}/{len(train)} waveforms")
    seconds = sum(len(w) for w in waves) / cfg.sample_rate
    return Waves(mels, waves, seconds)


def segments(data: Waves, idx: Tensor, frames: int, hop: int, gen: torch.Generator):
    """(B, n_mels, frames + 1) log-mels and the (B, frames * hop) samples they cover."""
    mels, waves = [], []
    for i in idx.tolist():
        mel = data.mels[i]
        start = int(torch.randint(0, mel.shape[1] - frames, (1,), generator=gen))
        mels.append(mel[:, start : start + frames + 1].float())
        waves.append(data.waves[i][start * hop : (start + frames) * hop])
    return torch.stack(mels), torch.stack(waves)


def stft_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Multi-resolution STFT loss: spectral convergence + log-magnitude L1, averaged."""
    total = pred.new_zeros(())
    for n_fft, hop in RESOLUTIONS:
        window = torch.hann_window(n_fft, device=pred.device)
        p, t = (
            torch.stft(w, n_fft, hop, window=window, return_complex=True).abs().clamp(min=1e-5)
            for w in (pred, target)
        )
        convergence = torch.linalg.norm(t - p) / torch.linalg.norm(t)
        total = total + convergence + F.l1_loss(p.log(), t.log())
    return total / len(RESOLUTIONS)


def mel_loss(pred: Tensor, target: Tensor, cfg: MelConfig) -> Tensor:
    return F.l1_loss(log_mel(pred, cfg), log_mel(target, cfg))


def run(
    run_cfg: common.RunConfig,
    name: str,
    net_cfg: VocoderConfig,
    settings: VocoderSettings,
    log: common.Log = print,
) -> Path:
    mel_cfg = MelConfig(hop=net_cfg.hop, n_fft=net_cfg.n_fft, n_mels=net_cfg.n_mels)
    data = load_waves(run_cfg.data or "", run_cfg.limit, settings.segment, log)
    torch.manual_seed(run_cfg.seed)
    net = Vocos(net_cfg)
    stacked = torch.cat([m.float() for m in data.mels], dim=1)
    net.set_stats(stacked.mean(1), stacked.std(1).clamp(min=1e-3))
    del stacked
    ema = common.frozen_copy(net)
    opt = torch.optim.AdamW(net.parameters(), lr=run_cfg.lr, betas=(0.8, 0.99))
    log(
        f"vocoder {common.count_params(net) / 1e6:.2f}M parameters; {len(data)} utterances "
        f"({data.seconds / 3600:.2f} h), segments of {settings.segment} frames"
    )
    frames = torch.full((run_cfg.batch,), settings.segment + 1)

    def step(i: int) -> float:
        net.train()
        idx = common.batch_indices(len(data), run_cfg.batch, run_cfg.seed, i)
        gen = common.step_generator(run_cfg.seed, i)
        mel, target = segments(data, idx, settings.segment, net_cfg.hop, gen)
        common.warmup_lr(opt, run_cfg.lr, i)
        pred = net(mel, frames[: len(idx)])
        loss = stft_loss(pred, target) + settings.mel_weight * mel_loss(pred, target, mel_cfg)
        return common.teacher_update(loss, opt, net, ema, settings.ema, i)

    seconds = common.train_loop(run_cfg, step, {"net": net, "ema": ema, "opt": opt}, log)
    return package(run_cfg, name, net_cfg, settings, ema, data, seconds, log)


def package(
    run_cfg: common.RunConfig,
    name: str,
    net_cfg: VocoderConfig,
    settings: VocoderSettings,
    ema: Vocos,
    data: Waves,
    seconds: float,
    log: common.Log,
) -> Path:
    out = Path(run_cfg.out)
    folder = out / str(run_cfg.version)
    folder.mkdir(parents=True, exist_ok=True)
    size = common.save_weights(ema, folder / "weights.safetensors", run_cfg.store_dtype)
    meta = {
        "name": name,
        "kind": "vocos",
        "sample_rate": MelConfig().sample_rate,
        "network": config_to_dict(net_cfg),
    }
    header = (
        f"# neural vocoder written by `fewstep train vocoder` (see {folder.name}/MODEL_CARD.md)\n"
    )
    (out / "vocoder.yaml").write_text(header + yaml.safe_dump(meta, sort_keys=False))
    epochs = run_cfg.steps * run_cfg.batch / max(len(data), 1)
    (folder / "MODEL_CARD.md").write_text(
        f"""# {name} v{run_cfg.version}

A Vocos-style neural vocoder (Siuzdenko et al. 2023) for fewstep's speech models:
ConvNeXt-1D backbone over the 80-bin natural-log mel (22.05 kHz, hop 256), predicting the
log magnitude and phase of the 1024-point STFT; the waveform is their inverse STFT.
{common.count_params(ema) / 1e6:.2f}M parameters. Speech models choose it with
`speech.vocoder: {name}` in their model.yaml (`griffin-lim` is the fallback).

## Recipe

    {common.command_line(run_cfg)}

## Data

The speech corpus of `fewstep train speech-data` (Festival's HTS voice
`cmu_us_slt_arctic_hts` speaking WordNet example sentences, all offline): {len(data)}
training utterances ({data.seconds / 3600:.2f} h); the corpus' held-out test sentences are
never trained on. Random segments of {settings.segment} frames; the input is the
utterance's log-mel from the corpus, the target its waveform.

## Settings

{common.settings_table(run_cfg, net_cfg, settings)}

Loss: multi-resolution STFT (spectral convergence + log-magnitude L1 at
{", ".join(f"{n}/{h}" for n, h in RESOLUTIONS)} n_fft/hop) + {settings.mel_weight} x log-mel L1.
No adversarial term. The package holds the EMA weights (decay {settings.ema}).

## Files

- `weights.safetensors` ({size / 1e6:.2f} MB, {run_cfg.store_dtype}; mel statistics included)

## Training

{common.hardware(run_cfg)}, device `{run_cfg.device}`; {seconds / 60:.1f} min wall time,
{run_cfg.steps} steps at batch {run_cfg.batch} ({epochs:.1f} epochs of utterances, one
segment each); {datetime.date.today().isoformat()}.

## Quality

Not measured yet: run `fewstep eval-speech`.
"""
    )
    log(f"wrote {folder}")
    return folder
