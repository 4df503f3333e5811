"""Step-level continuous batching: many requests' sampler generators, one forward pass.

Each active request holds a started sampler generator and its pending denoiser call
(x, sigma). Every tick `pick_batch` chooses the pending calls that share one forward pass:
the most urgent request's group (same model, version and sample shape; in static mode also
the same sampler, steps and guidance) in priority-then-age order, as many as fit in the
model's max_batch_size rows. Requests join and leave between ticks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engines.noise import RowNoise, row_seeds
from engines.samplers import SamplerGen, cat_cond, create, nfe, split_rows
from engines.schedules import karras_sigmas, teleport_sigmas
from service.jobs import Job


@dataclass
class Active:
    """A request being sampled: its generator and the denoiser call it waits for."""

    job: Job
    model: object  # engines.repository.LoadedModel
    gen: SamplerGen
    cond: dict[str, Tensor] | None
    nfe_total: int
    pending: tuple[Tensor, float] | None = None
    nfe: int = 0
    claimed_at: float = field(default_factory=time.time)
    first_forward_at: float | None = None
    forward_seconds: float = 0.0

    @property
    def rows(self) -> int:
        return self.job.rows

    def group(self, static: bool) -> tuple:
        job = self.job
        key = (job.model, job.version, tuple(self.pending[0].shape[1:]) if self.pending else ())
        return key + ((job.sampler, job.steps, job.guidance_scale, job.teleport) if static else ())


def start(job: Job, model, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Active:
    """Build the request's grid, initial noise and sampler, and run it to its first call.

    Raises SamplerError / ScheduleError (bad arguments) before any compute is used.
    """
    spec = model.spec
    s = spec.sampling
    labels = torch.tensor(job.labels, dtype=torch.long) if job.labels else None
    if job.teleport:
        follower = karras_sigmas(job.steps, s.sigma_min, s.teleport_sigma, s.rho)
        sigmas = teleport_sigmas(s.sigma_max, follower)
        name, opts = "teleport", {"gaussian": model.gaussian, "labels": labels, "then": job.sampler}
    else:
        sigmas = karras_sigmas(job.steps, s.sigma_min, s.sigma_max, s.rho)
        name, opts = job.sampler, {}
    noise = RowNoise(row_seeds(job.seed, job.n))
    x = noise.randn((job.n, *spec.shape), dtype=dtype, device=device) * float(sigmas[0])
    cond: dict[str, Tensor] | None = None
    if labels is not None:
        cond = {"label": labels.to(device)}
        if job.guidance_scale != 1.0:
            cond["guidance_scale"] = torch.full(
                (job.n,), job.guidance_scale, dtype=dtype, device=device
            )
    gen = create(name, x, sigmas, noise, **opts)
    active = Active(job, model, gen, cond, nfe(name, sigmas, opts))
    active.pending = next(gen)
    return active


def pick_batch(actives: list[Active], max_rows: int, static: bool = False) -> list[Active]:
    """The pending requests that share the next forward pass (a pure function)."""
    waiting = [a for a in actives if a.pending is not None]
    if not waiting:
        return []
    waiting.sort(key=lambda a: (-a.job.priority, a.job.submit_time))
    group = waiting[0].group(static)
    batch, rows = [], 0
    for active in waiting:
        if active.group(static) == group and rows + active.rows <= max(max_rows, waiting[0].rows):
            batch.append(active)
            rows += active.rows
    return batch


def forward(batch: list[Active]) -> list[Tensor]:
    """One forward pass over the batch's pending calls; x0 split back per request."""
    xs = [a.pending[0] for a in batch]
    sigma = torch.cat(
        [
            torch.full((len(x),), a.pending[1], dtype=x.dtype, device=x.device)
            for a, x in zip(batch, xs, strict=True)
        ]
    )
    denoiser = batch[0].model.denoiser
    with torch.inference_mode():
        out = denoiser(torch.cat(xs), sigma, cat_cond([a.cond for a in batch]))
    return split_rows(out, [len(x) for x in xs])
