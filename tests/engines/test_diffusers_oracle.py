"""Cross-check against diffusers' schedulers: same denoiser, same sigmas, same trajectory.

diffusers is a test-only oracle here. Each scheduler runs in its own VP coordinates on the
closed-form mixture (or a fixed random network, where the scheduler applies its own
scalings); fewstep runs the matching sampler in EDM coordinates on the same sigma grid.
"""

from __future__ import annotations

import pytest
import torch

from engines.analytic import GaussianMixture
from engines.denoisers import ConsistencyDenoiser, LCMDenoiser, VPDenoiser
from engines.noise import RowNoise
from engines.samplers import create, drive
from engines.schedules import DiscreteVP, consistency_sigmas, edm_to_vp, lcm_sigmas

schedulers = pytest.importorskip("diffusers.schedulers")

ROWS, DIM = 6, 4
TOL = 1e-5


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    return GaussianMixture.random(DIM, 3, seed=7)


def x_start(sigma_max: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randn(ROWS, DIM, generator=g, dtype=torch.float64) * sigma_max


def run_diffusers_ode(scheduler, sigmas: torch.Tensor, x_ve: torch.Tensor, mixture) -> torch.Tensor:
    """Drive a diffusers multistep scheduler with the exact x0 of the mixture; VE result."""
    alpha0, _ = edm_to_vp(sigmas[:1])
    x = x_ve * alpha0
    for i, t in enumerate(scheduler.timesteps):
        sigma = sigmas[i : i + 1]
        alpha, _ = edm_to_vp(sigma)
        x0 = mixture.denoise(x / alpha, sigma.expand(ROWS))
        x = scheduler.step(x0, t, x).prev_sample
    alpha_end, _ = edm_to_vp(sigmas[-1:])
    return x / alpha_end


def ours(name: str, x_ve, sigmas, mixture, **opts) -> torch.Tensor:
    gen = create(name, x_ve, sigmas, RowNoise(list(range(ROWS))), **opts)
    return drive(gen, mixture.denoiser())


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize(
    ("cls", "config", "name", "opts"),
    [
        ("DPMSolverMultistepScheduler", {"solver_order": 2}, "dpmpp_2m", {}),
        ("DPMSolverMultistepScheduler", {"solver_order": 3}, "dpmpp_3m", {"legacy_d2": True}),
        ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}, "unipc", {}),
        # bh1 into sigma = 0 gives NaN in diffusers (B_h = -inf times a zero residual), so
        # this case ends at sigma_min; fewstep's order-1 final step skips that product.
        (
            "UniPCMultistepScheduler",
            {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
            "unipc",
            {"order": 3, "variant": "bh1"},
        ),
        ("DEISMultistepScheduler", {"solver_order": 2}, "deis", {}),
    ],
)
def test_multistep_solvers_match(mixture, steps, cls, config, name, opts):
    scheduler = getattr(schedulers, cls)(prediction_type="sample", **config)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.to(torch.float64)
    x_ve = x_start(float(sigmas[0]))
    expected = run_diffusers_ode(scheduler, sigmas, x_ve, mixture)
    got = ours(name, x_ve, sigmas, mixture, **opts)
    assert (got - expected).abs().max() < TOL


def test_third_order_weight_differs_from_reference(mixture):
    """The default 3M uses the third-order weight, so it leaves the reference trajectory."""
    scheduler = schedulers.DPMSolverMultistepScheduler(prediction_type="sample", solver_order=3)
    scheduler.set_timesteps(20)
    sigmas = scheduler.sigmas.to(torch.float64)
    x_ve = x_start(float(sigmas[0]))
    expected = run_diffusers_ode(scheduler, sigmas, x_ve, mixture)
    assert (ours("dpmpp_3m", x_ve, sigmas, mixture) - expected).abs().max() > 100 * TOL


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_ddim_matches(mixture, steps):
    scheduler = schedulers.DDIMScheduler(
        prediction_type="sample", set_alpha_to_one=True, clip_sample=False
    )
    scheduler.set_timesteps(steps)
    bars = scheduler.alphas_cumprod.to(torch.float64)[scheduler.timesteps]
    sigmas = torch.cat([((1 - bars) / bars).sqrt(), torch.zeros(1, dtype=torch.float64)])
    x_ve = x_start(float(sigmas[0]))
    expected = run_diffusers_ode(scheduler, sigmas, x_ve, mixture)
    assert (ours("euler", x_ve, sigmas, mixture) - expected).abs().max() < TOL


class SharedNoise:
    """Replays fewstep's per-row noise to a diffusers scheduler's randn_tensor."""

    def __init__(self) -> None:
        self.noise = RowNoise(list(range(ROWS)))

    def __call__(self, shape, generator=None, device=None, dtype=None, **_):
        return self.noise.randn(shape, dtype=dtype or torch.float64)


def random_net(scale: float):
    """A fixed smooth 'network' so the schedulers' own scalings are exercised."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(DIM, DIM, generator=g, dtype=torch.float64) / DIM**0.5

    def net(x, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
        return torch.tanh(x.to(torch.float64) @ w + scale * t)

    return net


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_matches(monkeypatch, steps):
    from diffusers.schedulers import scheduling_lcm

    monkeypatch.setattr(scheduling_lcm, "randn_tensor", SharedNoise())
    net = random_net(1e-3)
    scheduler = schedulers.LCMScheduler()
    scheduler.set_timesteps(steps, original_inference_steps=50)
    schedule = DiscreteVP(scheduler.alphas_cumprod)
    sigmas = lcm_sigmas(schedule, steps)
    assert scheduler.timesteps.tolist() == schedule.lcm_timesteps(steps).tolist()

    x_ve = x_start(float(sigmas[0]))
    x_vp = x_ve * edm_to_vp(sigmas[:1])[0]
    for t in scheduler.timesteps:
        x_vp = scheduler.step(net(x_vp, t.to(torch.float64).expand(ROWS)), t, x_vp).prev_sample

    got = drive(
        create("lcm", x_ve, sigmas, RowNoise(list(range(ROWS)))), LCMDenoiser(net, schedule)
    )
    assert (got - x_vp).abs().max() < TOL


@pytest.mark.parametrize("indices", [[0], [0, 22], [0, 17, 30]])
def test_consistency_multistep_matches(monkeypatch, indices):
    from diffusers.schedulers import scheduling_consistency_models

    monkeypatch.setattr(scheduling_consistency_models, "randn_tensor", SharedNoise())
    net = random_net(1e-3)
    scheduler = schedulers.CMStochasticIterativeScheduler()
    scheduler.set_timesteps(timesteps=sorted(indices, reverse=True))

    sigmas = consistency_sigmas(indices)
    x = x_start(float(sigmas[0]))
    x_ref = x.clone()
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x_ref, t)
        x_ref = scheduler.step(net(model_in, t.expand(ROWS)), t, x_ref).prev_sample

    def unet(x_in, c_noise, cond=None):
        return net(x_in, c_noise)

    got = drive(
        create("cm_multistep", x, sigmas, RowNoise(list(range(ROWS)))), ConsistencyDenoiser(unet)
    )
    assert (got - x_ref).abs().max() < TOL


@pytest.mark.parametrize(("steps", "gamma"), [(2, 0.3), (4, 0.3), (4, 0.0), (8, 0.7)])
def test_tcd_matches(monkeypatch, steps, gamma):
    from diffusers.schedulers import scheduling_tcd

    monkeypatch.setattr(scheduling_tcd, "randn_tensor", SharedNoise())
    net = random_net(1e-3)
    scheduler = schedulers.TCDScheduler()
    scheduler.set_timesteps(steps, original_inference_steps=50)
    schedule = DiscreteVP(scheduler.alphas_cumprod)
    # TCD's last step lands on timestep 0, not on sigma 0
    sigmas = torch.cat([schedule.sigma(scheduler.timesteps.to(torch.float64)), schedule.sigmas[:1]])

    x_ve = x_start(float(sigmas[0]))
    x_vp = x_ve * edm_to_vp(sigmas[:1])[0]
    for t in scheduler.timesteps:
        out = net(x_vp, t.to(torch.float64).expand(ROWS))
        x_vp = scheduler.step(out, t, x_vp, eta=gamma).prev_sample

    noise = RowNoise(list(range(ROWS)))
    gen = create("tcd", x_ve, sigmas, noise, gamma=gamma, schedule=schedule)
    got = drive(gen, VPDenoiser(net, schedule, "eps")) * edm_to_vp(sigmas[-1:])[0]
    assert (got - x_vp).abs().max() < TOL
