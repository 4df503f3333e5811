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

from engines.denoisers import Guided
from engines.noise import row_seeds
from engines.samplers import SamplerGen, cat_cond, split_rows
from engines.sampling import start_sampler
from service.jobs import Job
from service.media import ENCODINGS, encode_images


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
    labels = torch.tensor(job.labels, dtype=torch.long) if job.labels else None
    seeds = row_seeds(job.seed, job.n)
    gen, cond, total = start_sampler(
        model,
        job.sampler,
        job.steps,
        seeds,
        labels,
        job.teleport,
        job.guidance_scale,
        dtype,
        device,
    )
    active = Active(job, model, gen, cond, total)
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


@dataclass
class Outcome:
    """What one request's step produced: another step, the finished outputs, or a failure."""

    active: Active
    kind: str  # "step", "done" or "failed"
    preview: bytes | None = None
    outputs: list[bytes] = field(default_factory=list)
    code: str | None = None
    message: str | None = None


def advance(active: Active, x0) -> Outcome:
    """Hand a request its x0, run its sampler to the next call, encode what is due."""
    active.nfe += 1
    values = x0.x0 if isinstance(x0, Guided) else x0
    data_range = active.model.spec.data_range
    if not bool(torch.isfinite(values).all()):
        message = f"the model returned non-finite values at step {active.nfe}"
        return Outcome(active, "failed", code="non_finite", message=message)
    model = active.model
    preview = None
    if active.job.preview:
        with torch.inference_mode():
            preview = encode_images(model.decode(values[:1]), data_range)[0]
    try:
        active.pending = active.gen.send(x0)
    except StopIteration as stop:
        active.pending = None
        if not bool(torch.isfinite(stop.value).all()):
            return Outcome(
                active,
                "failed",
                preview,
                code="non_finite",
                message="the final sample is not finite",
            )
        encode = ENCODINGS[active.job.output_format][0]
        with torch.inference_mode():
            final = model.decode(stop.value)
        return Outcome(active, "done", preview, encode(final, data_range))
    except Exception as exc:  # a sampler must never take the worker down
        active.pending = None
        return Outcome(active, "failed", code="sampler_error", message=f"the sampler failed: {exc}")
    return Outcome(active, "step", preview)


def step_batch(batch: list[Active]) -> tuple[list[Outcome], float]:
    """One tick's compute, run off the event loop: the forward pass, then every request's
    sampler step and encoding. Raises only if the forward pass itself fails."""
    begin = time.perf_counter()
    outputs = forward(batch)
    seconds = time.perf_counter() - begin
    for active in batch:
        active.forward_seconds += seconds
    return [advance(a, x0) for a, x0 in zip(batch, outputs, strict=True)], seconds
