"""`fewstep train speech-teacher | prodiff | comospeech`: the speech models' recipes.

Teacher (Grad-TTS prior + EDM, Karras et al. 2022): L = lambda(sigma) |D(x + sigma n,
sigma | mu) - x|^2 on random mel crops + |mu_frames - x|^2 + |log d_hat - log(1 + d)|^2,
sigma drawn from EDM's lognormal mixed with a log-uniform over [sigma_min, sigma_max], so
the top of the range, where 1- and 2-step samplers start, is trained too.

ProDiff (Huang et al. 2022): the student predicts x0 at the levels it samples at; its one
step sigma_i -> sigma_{i+1} learns the teacher's two DDIM steps (progressive distillation,
Salimans & Ho 2022: an N-step teacher gives an N/2-step student), target
x0* = (x_teacher - (s'/s) x) / (1 - s'/s).

CoMoSpeech (Ye et al. 2023): consistency distillation from the teacher's Heun steps on a
Karras grid, EMA target, consistency boundary scalings; the student starts from the teacher.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import Tensor

from engines.denoisers import Denoiser, EDMDenoiser, expand
from engines.nets.tts import TTS, TTSConfig, length_regulate
from engines.repository import Repository
from engines.schedules import karras_sigmas
from engines.speech import corpus
from engines.speech.model import SpeechConsistencyDenoiser
from engines.training import common, package_speech
from engines.training.cd import euler_step, heun_step, student_update


@dataclasses.dataclass
class TeacherSettings:
    sigma_min: float = 0.002
    sigma_max: float = 20.0
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_mix: float = 0.5  # share of noise levels drawn log-uniformly over the whole range
    crop: int = 128  # denoiser frames per row (the encoder sees whole utterances)
    ema: float = 0.999
    init: str | None = None  # an earlier teacher package to continue from (else fresh)


@dataclasses.dataclass
class ProDiffSettings:
    sigmas: tuple[float, ...] = (20.0, 1.0)  # the student's levels (then 0)
    crop: int = 128


@dataclasses.dataclass
class CMSettings:
    # The teacher's 4-step Euler (DDIM) path on a 4-point Karras grid, as latent consistency
    # models distil with DDIM steps: that path's end is intelligible (WER 0.19 on the 15
    # held-out sentences), while the exact ODE end an 18-point Heun grid converges to is
    # not, for this teacher (0.30; the student learned that: 0.46).
    grid: int = 4
    ema: float = 0.95
    serve_ema: float = 0.999
    sigma_min: float = 0.002
    sigma_max: float = 20.0
    rho: float = 7.0
    crop: int = 128
    loss: str = "l2"  # or "pseudo-huber" (Song & Dhariwal 2023, improved consistency training)
    solver: str = "euler"  # the teacher's ODE step between grid points, or "heun"


CM_LOSSES = ("l2", "pseudo-huber")
CM_SOLVERS = ("heun", "euler")


@dataclasses.dataclass
class Batch:
    phone: Tensor
    stress: Tensor
    final: Tensor
    durations: Tensor
    mel: Tensor  # (B, n_mels, T), standardised
    frames: Tensor  # (B,)

    def to(self, device: str) -> Batch:
        return Batch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def pad(rows: list[Tensor], value: float = 0) -> Tensor:
    """Right-pad 1-D or (C, T) tensors along their last axis and stack them."""
    size = max(r.shape[-1] for r in rows)
    return torch.stack(
        [torch.nn.functional.pad(r, (0, size - r.shape[-1]), value=value) for r in rows]
    )


def make_batch(utts: list[dict], mean: Tensor, std: Tensor) -> Batch:
    mels = [(u["mel"].float() - mean[:, None]) / std[:, None] for u in utts]
    return Batch(
        pad([u["phone"] for u in utts]),
        pad([u["stress"] for u in utts]),
        pad([u["final"] for u in utts]),
        pad([u["durations"] for u in utts]),
        pad(mels),
        torch.tensor([m.shape[-1] for m in mels]),
    )


def mel_stats(utts: list[dict]) -> tuple[Tensor, Tensor]:
    """Per-bin mean and standard deviation of the training log-mels (sigma_data = 1)."""
    allm = torch.cat([u["mel"].float() for u in utts], dim=1)
    return allm.mean(1), allm.std(1).clamp(min=1e-3)


def crop(x: Tensor, mu: Tensor, mask: Tensor, frames: Tensor, size: int, gen: torch.Generator):
    """Random `size`-frame windows of each row (rows shorter than size keep their padding)."""
    size = min(size, x.shape[-1])
    room = (frames - size).clamp(min=0).cpu()
    start = (torch.rand(len(frames), generator=gen) * (room + 1)).long().to(x.device)
    idx = (start[:, None] + torch.arange(size, device=x.device)[None, :]).clamp(max=x.shape[-1] - 1)

    def take(t: Tensor) -> Tensor:
        return torch.gather(t, 2, idx.unsqueeze(1).expand(-1, t.shape[1], -1))

    return take(x), take(mu), take(mask)


def masked_mse(a: Tensor, b: Tensor, mask: Tensor, weight: Tensor | None = None) -> Tensor:
    err = (a - b).square() * mask
    if weight is not None:
        err = err * expand(weight, err)
    return err.sum() / (mask.sum() * a.shape[1]).clamp(min=1)


def masked_pseudo_huber(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Improved consistency training's distance (Song & Dhariwal 2023), per row:
    sqrt(||a - b||^2 + c^2) - c over the row's unmasked values, c = 0.00054 sqrt(d) with d
    their count; the mean over rows, divided by sqrt(d) so its scale does not grow with the
    crop. Unlike the squared error it grows linearly for large errors, so a few badly
    matched rows do not pull the student towards blurring all of them."""
    err = ((a - b).square() * mask).flatten(1).sum(1)
    d = (mask.flatten(1).sum(1) * a.shape[1]).clamp(min=1)
    c = 0.00054 * d.sqrt()
    return ((err + c.square()).sqrt() - c).div(d.sqrt()).mean()


def encode_batch(model: TTS, b: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mu over frames (ground-truth durations), frame mask, predicted log-durations, phone mask."""
    mu, logdur, pmask = model.encoder(b.phone, b.stress, b.final)
    mu_f, fmask = length_regulate(mu, b.durations)
    return mu_f, fmask, logdur, pmask


def sample_sigma(n: int, s: TeacherSettings, gen: torch.Generator) -> Tensor:
    lognormal = (torch.randn(n, generator=gen) * s.p_std + s.p_mean).exp()
    lo, hi = math.log(s.sigma_min), math.log(s.sigma_max)
    uniform = (lo + torch.rand(n, generator=gen) * (hi - lo)).exp()
    pick = torch.rand(n, generator=gen) < s.sigma_mix
    return torch.where(pick, uniform, lognormal).clamp(s.sigma_min, s.sigma_max)


class Data:
    """The corpus' training utterances as seeded batches."""

    def __init__(self, path: str, limit: int = 0) -> None:
        data = corpus.load(path)
        self.utts = data["train"][: limit or None]
        self.test = data["test"]
        self.voice = data["voice"]
        self.path = path
        self.mean, self.std = mel_stats(self.utts)

    def batch(self, run: common.RunConfig, step: int) -> Batch:
        idx = common.batch_indices(len(self.utts), run.batch, run.seed, step)
        return make_batch([self.utts[i] for i in idx], self.mean, self.std).to(run.device)

    def hours(self) -> float:
        return sum(u["mel"].shape[1] for u in self.utts) * 256 / 22050 / 3600


def init_teacher(model: TTS, package_dir: str | None, log=print) -> str:
    """Start the teacher from an earlier teacher package's (EMA) weights, loaded as float32,
    when asked; returns a line for the model card ('' when not asked)."""
    if not package_dir:
        return ""
    earlier = Repository.of_folder(package_dir).load(Path(package_dir).name, runtimes=("torch",))
    if earlier.spec.kind != "speech" or earlier.spec.speech.parameterisation != "edm":
        raise common.RecipeError(f"--init {package_dir} is not a speech teacher package")
    net = earlier.spec.speech.network
    if net != model.cfg:
        raise common.RecipeError(
            f"--init {package_dir}: its network {net} differs from this run's {model.cfg}; "
            "give the network flags of its model card"
        )
    model.load_state_dict(earlier.modules[0].float().state_dict())
    log(f"teacher starts from {package_dir} v{earlier.spec.version} ({earlier.fingerprint})")
    return (
        f"Continued from the teacher `{package_dir}` v{earlier.spec.version} (fingerprint "
        f"`{earlier.fingerprint}`; see its card for its own steps): its weights as float32 "
        "(EMA starting equal to them), a fresh optimiser; the steps below come on top of "
        "those.\n"
    )


def run_teacher(run: common.RunConfig, net: TTSConfig, s: TeacherSettings, log=print) -> Path:
    data = Data(run.data, run.limit)
    torch.manual_seed(run.seed)
    model = TTS(net).to(run.device)
    model.set_stats(data.mean, data.std)
    notes = init_teacher(model, s.init, log)
    ema = common.frozen_copy(model)
    opt = torch.optim.Adam(model.parameters(), lr=run.lr)
    denoiser = EDMDenoiser(model.denoiser, 1.0)
    log(
        f"TTS {common.count_params(model) / 1e6:.2f}M parameters; "
        f"{len(data.utts)} utterances, {data.hours():.2f} h"
    )

    def step(i: int) -> float:
        b = data.batch(run, i)
        gen = common.step_generator(run.seed, i)
        common.warmup_lr(opt, run.lr, i)
        mu_f, fmask, logdur, pmask = encode_batch(model, b)
        prior = masked_mse(mu_f, b.mel, fmask)
        dur = masked_mse(logdur.unsqueeze(1), torch.log1p(b.durations.float()).unsqueeze(1), pmask)
        x, mu_c, m_c = crop(b.mel, mu_f, fmask, b.frames, s.crop, gen)
        sigma = sample_sigma(len(x), s, gen).to(run.device)
        noise = common.randn(x.shape, gen, run.device)
        x0 = denoiser(x + noise * expand(sigma, x), sigma, {"mu": mu_c, "mask": m_c})
        diff = masked_mse(x0, x, m_c, (sigma**2 + 1) / sigma**2)
        return common.teacher_update(diff + prior + dur, opt, model, ema, s.ema, i)

    seconds = common.train_loop(run, step, {"model": model, "ema": ema, "opt": opt}, log)
    return package_speech.write(
        package_speech.SpeechPackage(
            "teacher", run, net, ema, (s,), seconds, data, run.steps, notes
        ),
        log,
    )


def student_of(run: common.RunConfig, folder: str):
    """The teacher package, its network, the data, and a student that starts as the
    teacher's copy with the encoder frozen (students learn the denoiser only)."""
    loaded = Repository.of_folder(folder).load(Path(folder).name, runtimes=("torch",))
    if loaded.spec.kind != "speech" or loaded.spec.speech.parameterisation != "edm":
        raise common.RecipeError(f"{folder} is not a speech teacher package (kind speech, edm)")
    teacher = loaded.modules[0].to(run.device)
    student = TTS(loaded.spec.speech.network).to(run.device)
    student.load_state_dict(teacher.state_dict())
    student.encoder.requires_grad_(False)
    return loaded, teacher, Data(run.data, run.limit), student


def student_batch(data: Data, run: common.RunConfig, teacher: TTS, opt, step: int, size: int):
    """A distillation step's crops, their cond from the teacher's encoder, and the step's
    generator; warms up the student's learning rate."""
    b = data.batch(run, step)
    gen = common.step_generator(run.seed, step)
    common.warmup_lr(opt, run.lr, step, warmup=100)
    with torch.no_grad():
        mu_f, fmask, _, _ = encode_batch(teacher, b)
        x, mu_c, m_c = crop(b.mel, mu_f, fmask, b.frames, size, gen)
    return x, {"mu": mu_c, "mask": m_c}, gen


def ddim(denoiser: Denoiser, x: Tensor, sigma: float, sigma_next: float, cond: dict) -> Tensor:
    """One deterministic DDIM (Euler) step of the PF-ODE in x0 form."""
    sig = torch.full((len(x),), sigma, device=x.device)
    x0 = denoiser(x, sig, cond)
    return x0 + (sigma_next / sigma) * (x - x0)


def run_prodiff(run: common.RunConfig, teacher_dir: str, s: ProDiffSettings, log=print) -> Path:
    teacher_model, teacher, data, student = student_of(run, teacher_dir)
    net = teacher_model.spec.speech.network
    served = common.frozen_copy(student)
    opt = torch.optim.Adam(student.denoiser.parameters(), lr=run.lr)
    f_teacher, f_student = EDMDenoiser(teacher.denoiser, 1.0), EDMDenoiser(student.denoiser, 1.0)
    levels = [*s.sigmas, 0.0]
    log(f"ProDiff student at sigmas {list(s.sigmas)} from {teacher_dir}")

    def step(i: int) -> float:
        x, cond, gen = student_batch(data, run, teacher, opt, i, s.crop)
        m_c = cond["mask"]
        with torch.no_grad():
            k = int(torch.randint(0, len(s.sigmas), (1,), generator=gen))
            hi, lo = levels[k], levels[k + 1]
            mid = math.sqrt(hi * lo) if lo > 0 else hi * 0.25
            x_t = x + hi * common.randn(x.shape, gen, run.device)
            x_mid = ddim(f_teacher, x_t, hi, mid, cond)
            x_lo = ddim(f_teacher, x_mid, mid, lo, cond)
            target = (x_lo - (lo / hi) * x_t) / (1 - lo / hi)
        sigma = torch.full((len(x),), hi, device=run.device)
        loss = masked_mse(f_student(x_t, sigma, cond), target, m_c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.denoiser.parameters(), 1.0)
        opt.step()
        common.ema_update(served, student, min(0.999, (1 + i) / (10 + i)))
        return loss.item()

    seconds = common.train_loop(run, step, {"student": student, "served": served, "opt": opt}, log)
    notes = (
        f"Distilled from the teacher package `{teacher_dir}` (fingerprint "
        f"`{teacher_model.fingerprint}`): progressive distillation of the teacher's 4-step DDIM "
        f"path into 2 x0 steps at sigma {list(s.sigmas)}, {run.steps} steps."
    )
    pkg = package_speech.SpeechPackage(
        "prodiff", run, net, served, (s,), seconds, data, run.steps, notes, sigmas=s.sigmas
    )
    return package_speech.write(pkg, log)


def run_comospeech(run: common.RunConfig, teacher_dir: str, s: CMSettings, log=print) -> Path:
    if s.loss not in CM_LOSSES:
        raise common.RecipeError(f"loss must be one of {list(CM_LOSSES)}, got {s.loss!r}")
    if s.solver not in CM_SOLVERS:
        raise common.RecipeError(f"solver must be one of {list(CM_SOLVERS)}, got {s.solver!r}")
    if s.grid < 2:
        raise common.RecipeError(f"the grid needs at least 2 points, got {s.grid}")
    distance = masked_mse if s.loss == "l2" else masked_pseudo_huber
    solve = heun_step if s.solver == "heun" else euler_step
    teacher_model, teacher, data, student = student_of(run, teacher_dir)
    net = teacher_model.spec.speech.network
    target, served = common.frozen_copy(student), common.frozen_copy(student)
    f_teacher = EDMDenoiser(teacher.denoiser, 1.0)
    f_student = SpeechConsistencyDenoiser(student.denoiser, 1.0, s.sigma_min)
    f_target = SpeechConsistencyDenoiser(target.denoiser, 1.0, s.sigma_min)
    opt = torch.optim.Adam(student.denoiser.parameters(), lr=run.lr)
    ts = karras_sigmas(s.grid - 1, s.sigma_min, s.sigma_max, s.rho, final_zero=False).flip(0)
    ts = ts.float().to(run.device)
    log(
        f"CoMoSpeech consistency distillation, teacher {s.solver} steps on a Karras grid of "
        f"{s.grid} points, {s.loss} loss, "
        f"from {teacher_dir}"
    )

    def step(i: int) -> float:
        x, cond, gen = student_batch(data, run, teacher, opt, i, s.crop)
        m_c = cond["mask"]
        with torch.no_grad():
            n = torch.randint(0, s.grid - 1, (len(x),), generator=gen).to(run.device)
            t, t_next = ts[n + 1], ts[n]
            x_t = x + expand(t, x) * common.randn(x.shape, gen, run.device)
            x_hat = solve(f_teacher, x_t, t, t_next, cond)
            goal = f_target(x_hat, t_next, cond)
        loss = distance(f_student(x_t, t, cond), goal, m_c)
        return student_update(loss, opt, (student, target, served), s.ema, s.serve_ema, i)

    state = {"student": student, "target": target, "served": served, "opt": opt}
    seconds = common.train_loop(run, step, state, log)
    notes = (
        f"Distilled from the teacher package `{teacher_dir}` (fingerprint "
        f"`{teacher_model.fingerprint}`): consistency distillation with the teacher's "
        f"{s.solver.capitalize()} steps on a Karras grid of {s.grid} points, {s.loss} loss, "
        f"EMA target {s.ema}, {run.steps} steps."
    )
    pkg = package_speech.SpeechPackage(
        "comospeech", run, net, served, (s,), seconds, data, run.steps, notes
    )
    return package_speech.write(pkg, log)
