"""`fewstep train cd`: consistency distillation (Song et al. 2023) from an EDM teacher.

For n ~ U{1..N-1} on a Karras grid t_1 = sigma_min < ... < t_N = sigma_max: x_{n+1} =
x + t_{n+1} z; one Heun step of the teacher's PF-ODE gives x_hat_n; the loss is the
pseudo-Huber distance (Song & Dhariwal 2023) between the student f(x_{n+1}, t_{n+1}) and
the EMA target f-(x_hat_n, t_n), both with consistency boundary scalings. The student
starts from the teacher's weights: its noise_scale is the teacher's / 1000 because the
consistency c_noise (250 log sigma) is 1000x EDM's (log(sigma) / 4).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import Tensor

from engines.denoisers import ConsistencyDenoiser, Denoiser, EDMDenoiser, expand
from engines.nets import UNet
from engines.repository import Repository
from engines.schedules import karras_sigmas
from engines.training import common, package

TORCH = ("torch",)  # training loads packages to run their torch modules directly


@dataclasses.dataclass
class CDSettings:
    """Consistency distillation settings (CIFAR-10 CD used N = 18, mu = 0.95)."""

    grid: int = 18
    ema: float = 0.95  # target network
    serve_ema: float = 0.999  # weights that are shipped
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    huber_c: float = 0.00054  # times sqrt(dim), Song & Dhariwal 2023
    teacher_guidance: float = 1.0
    init: str | None = None  # an earlier `cm` package to continue from (else the teacher)


def student_update(loss, opt, nets, ema: float, serve_ema: float, step: int) -> float:
    """One optimiser step of a distilled student, then its two EMA copies: the target the
    loss compares against, and the served weights (warmed up over the first steps)."""
    student, target, served = nets
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    common.ema_update(target, student, ema)
    common.ema_update(served, student, min(serve_ema, (1 + step) / (10 + step)))
    return loss.item()


def init_from(student: UNet, package_dir: str | None, kind: str, log: common.Log) -> str:
    """Start a student from an earlier student package of the same kind and network (to
    continue a distillation); returns a line for the model card ('' when not asked)."""
    if not package_dir:
        return ""
    earlier = Repository.of_folder(package_dir).load(Path(package_dir).name, runtimes=TORCH)
    if earlier.spec.kind != kind:
        raise common.RecipeError(
            f"--init {package_dir} is a {earlier.spec.kind!r} package, not {kind!r}"
        )
    net = earlier.modules[0]
    if net.config != student.config:
        raise common.RecipeError(
            f"--init {package_dir}: its network {net.config} differs from the student's "
            f"{student.config}"
        )
    student.load_state_dict(net.state_dict())
    log(f"student starts from {package_dir} v{earlier.spec.version} ({earlier.fingerprint})")
    return (
        f"Continued from the student `{package_dir}` v{earlier.spec.version} (fingerprint "
        f"`{earlier.fingerprint}`; see its card for its own steps): the steps below come on "
        "top of those, with a fresh optimiser.\n"
    )


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """sqrt(|a - b|^2 + c^2) - c per row, averaged (c scaled by sqrt(dim) by the caller)."""
    return (torch.sqrt((a - b).flatten(1).square().sum(1) + c * c) - c).mean()


def heun_step(teacher: Denoiser, x: Tensor, t: Tensor, t_next: Tensor, cond: dict) -> Tensor:
    """One Heun step of the PF-ODE dx/dt = (x - D(x, t)) / t from t to t_next (per row)."""
    d = (x - teacher(x, t, cond)) / expand(t, x)
    x_euler = x + expand(t_next - t, x) * d
    d_next = (x_euler - teacher(x_euler, t_next, cond)) / expand(t_next, x)
    return x + expand(t_next - t, x) * (d + d_next) / 2


def euler_step(teacher: Denoiser, x: Tensor, t: Tensor, t_next: Tensor, cond: dict) -> Tensor:
    """One Euler (DDIM) step of the PF-ODE from t to t_next (per row), in x0 form."""
    x0 = teacher(x, t, cond)
    return x0 + expand(t_next / t, x) * (x - x0)


def guided(denoiser: Denoiser, w: float, null: int) -> Denoiser:
    """Classifier-free guidance at a fixed scale w (1: the conditional denoiser itself)."""
    if w == 1.0:
        return denoiser

    def fn(x: Tensor, sigma: Tensor, cond: dict) -> Tensor:
        uncond = {"label": torch.full_like(cond["label"], null)}
        both = denoiser(
            torch.cat([x, x]),
            torch.cat([sigma, sigma]),
            {"label": torch.cat([cond["label"], uncond["label"]])},
        )
        x_c, x_u = both.chunk(2)
        return x_u + w * (x_c - x_u)

    return fn


def run(
    run_cfg: common.RunConfig, teacher_dir: str, s: CDSettings, log: common.Log = print
) -> Path:
    # training runs the torch modules themselves: no engine build for the teacher
    teacher_model = Repository.of_folder(teacher_dir).load(Path(teacher_dir).name, runtimes=TORCH)
    if teacher_model.spec.kind != "edm" or teacher_model.spec.autoencoder is not None:
        raise common.RecipeError(f"{teacher_dir} is not a pixel-space 'edm' teacher package")
    spec, teacher_net = teacher_model.spec, teacher_model.modules[0].to(run_cfg.device)
    teacher = guided(
        EDMDenoiser(teacher_net, spec.sigma_data), s.teacher_guidance, spec.network.classes
    )
    x, y = common.training_data(run_cfg)
    torch.manual_seed(run_cfg.seed)
    config = dataclasses.replace(spec.network, noise_scale=spec.network.noise_scale / 1000)
    student = UNet(config).to(run_cfg.device)
    student.load_state_dict(teacher_net.state_dict())
    continued = init_from(student, s.init, "cm", log)
    target, served = common.frozen_copy(student), common.frozen_copy(student)
    f_student = ConsistencyDenoiser(student, spec.sigma_data, s.sigma_min)
    f_target = ConsistencyDenoiser(target, spec.sigma_data, s.sigma_min)
    opt = torch.optim.Adam(student.parameters(), lr=run_cfg.lr)
    # ascending grid t_1 < ... < t_N
    ts = karras_sigmas(s.grid - 1, s.sigma_min, s.sigma_max, s.rho, final_zero=False).flip(0)
    ts = ts.float().to(run_cfg.device)
    c = s.huber_c * math.sqrt(x[0].numel())
    log(f"student {common.count_params(student) / 1e6:.2f}M parameters from {teacher_dir}")

    def step(i: int) -> float:
        idx = common.batch_indices(len(x), run_cfg.batch, run_cfg.seed, i)
        gen = common.step_generator(run_cfg.seed, i)
        x0, cond = x[idx].to(run_cfg.device), {"label": y[idx].to(run_cfg.device)}
        n = torch.randint(0, s.grid - 1, (len(idx),), generator=gen).to(run_cfg.device)
        t, t_next = ts[n + 1], ts[n]
        x_t = x0 + expand(t, x0) * common.randn(x0.shape, gen, run_cfg.device)
        common.warmup_lr(opt, run_cfg.lr, i, warmup=100)
        with torch.no_grad(), common.autocast(run_cfg):
            x_hat = heun_step(teacher, x_t, t, t_next, cond)
            goal = f_target(x_hat, t_next, cond).float()
        with common.autocast(run_cfg):
            loss = pseudo_huber(f_student(x_t, t, cond).float(), goal, c)
        return student_update(loss, opt, (student, target, served), s.ema, s.serve_ema, i)

    state = {"student": student, "target": target, "served": served, "opt": opt}
    seconds = common.train_loop(run_cfg, step, state, log)
    return package.write(
        package.Package(
            kind="cm",
            run=run_cfg,
            network=config,
            sigma_data=spec.sigma_data,
            weights={"weights.safetensors": served},
            settings=(s,),
            seconds=seconds,
            examples=len(x),
            notes=f"\nDistilled from the teacher package `{teacher_dir}` "
            f"(fingerprint `{teacher_model.fingerprint}`).\n{continued}",
        ),
        log,
    )
