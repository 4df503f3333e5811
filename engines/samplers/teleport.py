"""The `teleport` sampler: one exact Gaussian jump, then any other sampler."""

from __future__ import annotations

from torch import Tensor

from engines.gaussian import GaussianStats
from engines.noise import RowNoise
from engines.samplers.base import INFO, SamplerError, SamplerGen, create, register


def _min_steps(opts: dict) -> int:
    then = opts.get("then", "dpmpp_2m")
    if then not in INFO or then == "teleport":
        raise SamplerError(
            f"teleport's `then` must be another sampler, one of {sorted(set(INFO) - {'teleport'})}"
        )
    return 1 + INFO[then].min_steps(opts.get("then_opts") or {})


@register(family="teleport", min_steps=_min_steps)
def teleport(
    x: Tensor,
    sigmas: Tensor,
    noise: RowNoise,
    gaussian: GaussianStats | None = None,
    labels: Tensor | None = None,
    then: str = "dpmpp_2m",
    then_opts: dict | None = None,
) -> SamplerGen:
    """Analytical teleportation (Wang & Vastola 2024): jump sigmas[0] -> sigmas[1] along the
    exact flow of the data's Gaussian approximation (0 NFE), then run `then` on sigmas[1:].

    Build the grid with engines.schedules.teleport_sigmas.
    """
    if gaussian is None:
        raise SamplerError(
            "teleport needs gaussian= the model's GaussianStats (teleport.safetensors)"
        )
    x = gaussian.flow(x, float(sigmas[0]), float(sigmas[1]), labels)
    return (yield from create(then, x, sigmas[1:], noise, **(then_opts or {})))
