"""`fewstep train lcm`: latent consistency distillation with guidance (Luo et al. 2023).

Skipping-step consistency distillation in the latent teacher's space: timesteps t = k i
+ k - 1 on a discrete scaled-linear VP schedule (k = T / original_steps), w ~ U[w_min,
w_max] per example, one DDIM (Euler) step of the teacher with classifier-free guidance
x0 = x0_c + w (x0_c - x0_u) from t to t - k, and the pseudo-Huber distance between the
student f(x_t, t, w, c) and the EMA target f-(x_{t-k}, t - k, w, c) under LCM's boundary
scalings. w reaches the student as LCM's sinusoidal guidance embedding (scale = 1 + w).
The student starts as the teacher (the guidance projection starts at zero).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from engines.denoisers import DiscreteTimeEDM, EDMDenoiser, LCMDenoiser
from engines.nets import UNet
from engines.repository import LatentConsistency, Repository
from engines.training import cd, common, latent, package


@dataclasses.dataclass
class LCMSettings:
    grid: int = 50  # original_steps: the DDIM grid the skipping step walks on
    ema: float = 0.95
    serve_ema: float = 0.999
    w_min: float = 0.0
    w_max: float = 3.0
    guidance_dim: int = 64
    huber_c: float = 0.001  # times sqrt(dim)
    init: str | None = None  # an earlier `lcm` package to continue from (else the teacher)


def run(
    run_cfg: common.RunConfig, teacher_dir: str, s: LCMSettings, log: common.Log = print
) -> Path:
    teacher_model = Repository.of_folder(teacher_dir).load(
        Path(teacher_dir).name, runtimes=cd.TORCH
    )
    spec = teacher_model.spec
    if spec.kind != "edm" or spec.autoencoder is None:
        raise common.RecipeError(f"{teacher_dir} is not a latent 'edm' teacher (train lcm-teacher)")
    teacher_net, ae = (m.to(run_cfg.device) for m in teacher_model.modules)
    teacher = EDMDenoiser(teacher_net, spec.sigma_data)
    schedule = LatentConsistency(original_steps=s.grid)
    vp = schedule.vp()
    x, y = common.training_data(run_cfg)
    z = latent.encode_all(ae, x, run_cfg.device)
    torch.manual_seed(run_cfg.seed)
    config = dataclasses.replace(spec.network, guidance_dim=s.guidance_dim)
    student = UNet(config).to(run_cfg.device)
    missing = student.load_state_dict(teacher_net.state_dict(), strict=False).missing_keys
    if any(not k.startswith("guidance.") for k in missing):
        raise common.RecipeError(f"teacher weights do not fit the student: missing {missing}")
    continued = cd.init_from(student, s.init, "lcm", log)
    target, served = common.frozen_copy(student), common.frozen_copy(student)

    def consistency(net: UNet) -> LCMDenoiser:
        inner = DiscreteTimeEDM(EDMDenoiser(net, spec.sigma_data), vp)
        return LCMDenoiser(
            inner, vp, "x0", schedule.timestep_scaling, schedule.boundary_sigma_data, s.guidance_dim
        )

    f_student, f_target = consistency(student), consistency(target)
    opt = torch.optim.Adam(student.parameters(), lr=run_cfg.lr)
    skip = schedule.timesteps // s.grid
    c = s.huber_c * math.sqrt(z[0].numel())
    null = spec.network.classes
    log(f"LCM student {common.count_params(student) / 1e6:.2f}M parameters from {teacher_dir}")

    def step(i: int) -> float:
        idx = common.batch_indices(len(z), run_cfg.batch, run_cfg.seed, i)
        gen = common.step_generator(run_cfg.seed, i)
        dev = run_cfg.device
        z0, labels = z[idx].to(dev), y[idx].to(dev)
        k = torch.randint(0, s.grid, (len(idx),), generator=gen)
        t = (k * skip + skip - 1).double()
        sigma, sigma_prev = vp.sigma(t).float().to(dev), vp.sigma((t - skip).clamp(min=0))
        sigma_prev = sigma_prev.float().to(dev)
        w = (torch.rand(len(idx), generator=gen) * (s.w_max - s.w_min) + s.w_min).to(dev)
        x_t = z0 + sigma[:, None, None, None] * common.randn(z0.shape, gen, dev)
        cond = {"label": labels, "guidance_scale": 1 + w}
        common.warmup_lr(opt, run_cfg.lr, i, warmup=100)
        with torch.no_grad(), common.autocast(run_cfg):
            both = teacher(
                torch.cat([x_t, x_t]),
                torch.cat([sigma, sigma]),
                {"label": torch.cat([labels, torch.full_like(labels, null)])},
            ).float()
            x0_c, x0_u = both.chunk(2)
            x0 = x0_c + w[:, None, None, None] * (x0_c - x0_u)
            ratio = (sigma_prev / sigma)[:, None, None, None]
            x_prev = ratio * x_t + (1 - ratio) * x0
            goal = f_target(x_prev, sigma_prev, cond).float()
        with common.autocast(run_cfg):
            loss = cd.pseudo_huber(f_student(x_t, sigma, cond).float(), goal, c)
        return cd.student_update(loss, opt, (student, target, served), s.ema, s.serve_ema, i)

    state = {"student": student, "target": target, "served": served, "opt": opt}
    seconds = common.train_loop(run_cfg, step, state, log)
    return package.write(
        package.Package(
            kind="lcm",
            run=run_cfg,
            network=config,
            sigma_data=spec.sigma_data,
            weights={"weights.safetensors": served, "autoencoder.safetensors": ae},
            autoencoder=spec.autoencoder,
            schedule=schedule,
            shape=spec.shape,
            settings=(s,),
            seconds=seconds,
            examples=len(x),
            notes=f"\nDistilled from the latent teacher `{teacher_dir}` "
            f"(fingerprint `{teacher_model.fingerprint}`).\n{continued}",
        ),
        log,
    )
