"""Every parameterisation wrapper turns an exact network back into the exact denoiser."""

import math

import pytest
import torch

from engines.analytic import GaussianMixture
from engines.denoisers import (
    CFGDenoiser,
    ConsistencyDenoiser,
    EDMDenoiser,
    FlowDenoiser,
    LCMDenoiser,
    VPDenoiser,
    guidance_embedding,
)
from engines.schedules import CosineVP, DiscreteVP, LinearVP

GMM = GaussianMixture.random(5, 3, seed=1)


def points(sigmas):
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor(sigmas, dtype=torch.float64)
    x0 = GMM.sample(len(sigmas), g)
    return x0 + sigma[:, None] * torch.randn(
        len(sigmas), 5, generator=g, dtype=torch.float64
    ), sigma


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("schedule", [LinearVP(), CosineVP(), DiscreteVP.scaled_linear()])
def test_vp_wrappers_recover_the_exact_denoiser(schedule, prediction):
    lo, hi = schedule.sigma_min * 1.01, min(schedule.sigma_max, 80.0) * 0.99
    x, sigma = points([lo, 0.3, 1.0, 5.0, hi])
    denoiser = VPDenoiser(GMM.vp_net(schedule, prediction), schedule, prediction)
    assert torch.allclose(denoiser(x, sigma), GMM.denoise(x, sigma), atol=1e-8)


def test_vp_wrapper_rejects_unknown_prediction():
    with pytest.raises(ValueError, match="eps"):
        VPDenoiser(lambda *a: a[0], LinearVP(), "score")


def inverse_edm_net(wrapper):
    """The network F for which wrapper(F) is exactly the mixture's denoiser."""

    def net(x_in, c_noise, cond=None):
        sigma = (
            torch.exp(4 * c_noise) if type(wrapper) is EDMDenoiser else torch.exp(c_noise / 250)
        ).to(torch.float64)
        c_skip, c_out, c_in = (c[:, None] for c in wrapper.scalings(sigma))
        x = x_in / c_in
        return (GMM.denoise(x, sigma) - c_skip * x) / c_out

    return net


@pytest.mark.parametrize("cls", [EDMDenoiser, ConsistencyDenoiser])
def test_edm_and_consistency_preconditioning(cls):
    x, sigma = points([0.01, 0.5, 2.0, 80.0])
    wrapper = cls(None)
    wrapper.net = inverse_edm_net(wrapper)
    assert torch.allclose(wrapper(x, sigma), GMM.denoise(x, sigma), atol=1e-9)


def test_edm_scalings_are_karras():
    c_skip, c_out, c_in = EDMDenoiser(None, 0.5).scalings(torch.tensor([1.0], dtype=torch.float64))
    assert c_skip.item() == pytest.approx(0.25 / 1.25)
    assert c_out.item() == pytest.approx(0.5 / math.sqrt(1.25))
    assert c_in.item() == pytest.approx(1 / math.sqrt(1.25))


def test_consistency_boundary_is_identity():
    x, _ = points([1.0, 1.0])
    sigma = torch.full((2,), 0.002, dtype=torch.float64)
    f = ConsistencyDenoiser(lambda x_in, c, cond=None: torch.full_like(x_in, 123.0))
    assert torch.allclose(f(x, sigma), x)


def test_lcm_boundary_and_guidance_embedding():
    sched = DiscreteVP.scaled_linear()
    seen = {}

    def net(x_vp, t, cond):
        seen.update(cond)
        return torch.zeros_like(x_vp)

    lcm = LCMDenoiser(net, sched, embedding_dim=8)
    x, _ = points([1.0, 1.0])
    sigma = sched.sigma(torch.tensor([0.0, 999.0]))
    out = lcm(x, sigma, {"guidance_scale": torch.tensor([1.0, 8.0], dtype=torch.float64)})
    alpha = torch.rsqrt(1 + sigma**2)[:, None]
    # t = 0: c_skip = 1, c_out = 0, so f(x) = x_vp; eps = 0 makes x0 = x at any t.
    assert torch.allclose(out[0], (x * alpha)[0])
    assert seen["w_embedding"].shape == (2, 8)
    emb = guidance_embedding(torch.tensor([0.0, 7.0]), 8)
    assert emb[0].tolist() == [0.0] * 4 + [1.0] * 4
    assert emb[1, 0].item() == pytest.approx(math.sin(7000.0))
    with pytest.raises(ValueError, match="guidance_scale"):
        lcm(x, sigma, None)


def test_flow_velocity_wrapper():
    def velocity(x_t, t, cond=None):
        sigma = (t / (1 - t)).to(torch.float64)
        x = x_t / (1 - t[:, None])
        x0 = GMM.denoise(x, sigma)
        return (x - x0) / sigma[:, None] - x0

    x, sigma = points([0.05, 1.0, 20.0])
    assert torch.allclose(FlowDenoiser(velocity)(x, sigma), GMM.denoise(x, sigma), atol=1e-9)


def test_cfg_batches_only_guided_rows():
    calls = []

    def inner(x, sigma, cond):
        calls.append(len(x))
        return x + cond["label"].to(x.dtype)[:, None]

    cfg = CFGDenoiser(inner, null_label=10)
    x = torch.zeros(3, 2, dtype=torch.float64)
    cond = {
        "label": torch.tensor([1, 2, 3]),
        "guidance_scale": torch.tensor([1.0, 3.0, 0.0], dtype=torch.float64),
    }
    out = cfg(x, torch.ones(3, dtype=torch.float64), cond)
    assert calls == [5]  # 3 conditional rows + 2 unconditional, one forward pass
    assert out[:, 0].tolist() == [1.0, 10 + 3 * (2 - 10), 10.0]
