"""Gaussian statistics, the closed-form jump, and teleportation as a sampler prefix."""

import pytest
import torch

from engines.analytic import GaussianMixture
from engines.gaussian import GaussianStats
from engines.noise import RowNoise
from engines.samplers import create, drive
from engines.schedules import karras_sigmas, teleport_sigmas


def test_jump_matches_the_exact_flow_of_a_gaussian():
    """The closed form against an independent high-accuracy ODE solve (float64)."""
    single = GaussianMixture.random(5, 1, seed=4)
    stats = GaussianStats.from_moments(single.means, single.covs, (5,))
    x = torch.randn(6, 5, dtype=torch.float64) * 80
    for sigma_to in (40.0, 5.0, 0.5):
        jump = stats.flow(x, 80.0, sigma_to)
        solved = single.flow(x, 80.0, sigma_to, rtol=1e-12)
        assert (jump - solved).abs().max() < 1e-6


def test_closed_form_denoiser_matches_the_mixture_of_one():
    single = GaussianMixture.random(4, 1, seed=5)
    stats = GaussianStats.from_moments(single.means, single.covs, (4,))
    x = torch.randn(3, 4, dtype=torch.float64) * 3
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    assert torch.allclose(stats.denoise(x, sigma), single.denoise(x, sigma), atol=1e-12)


def test_low_rank_jump_keeps_the_complement_on_the_noise_ray():
    single = GaussianMixture.random(6, 1, seed=6)
    full = GaussianStats.from_moments(single.means, single.covs, (6,))
    low = GaussianStats.from_moments(single.means, single.covs, (6,), rank=2)
    assert low.eigvecs.shape == (1, 6, 2)
    x = torch.randn(4, 6, dtype=torch.float64) * 80
    # far above the data scale the discarded directions barely matter
    assert (low.flow(x, 80.0, 40.0) - full.flow(x, 80.0, 40.0)).abs().max() < 0.05
    # the complement of the kept eigenvectors scales exactly by sigma ratio
    u = low.eigvecs[0]
    resid = (x - low.mean) - (x - low.mean) @ u @ u.T
    out = low.flow(x, 80.0, 20.0) - low.mean
    assert torch.allclose(out - out @ u @ u.T, resid * 0.25, atol=1e-10)


def test_fit_estimates_per_class_statistics_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 2, 2, generator=g, dtype=torch.float64) * 0.5 + 3
    b = torch.randn(4000, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    data, labels = torch.cat([a, b]), torch.cat([torch.zeros(4000), torch.ones(4000)]).long()
    stats = GaussianStats.fit(data, labels, rank=3, class_names=("a", "b"))
    assert stats.mean.shape == (2, 4) and stats.eigvals.shape == (2, 3)
    assert torch.allclose(stats.mean[0], torch.full((4,), 3.0, dtype=torch.float64), atol=0.05)
    assert torch.allclose(stats.eigvals[1], torch.full((3,), 4.0, dtype=torch.float64), rtol=0.1)
    stats.save(tmp_path / "teleport.safetensors")
    back = GaussianStats.load(tmp_path / "teleport.safetensors")
    assert (
        back.shape == (2, 2)
        and back.labels == ("a", "b")
        and torch.equal(back.eigvecs, stats.eigvecs)
    )
    # per-class denoising picks each row's own class
    x = torch.zeros(2, 2, 2, dtype=torch.float64)
    out = back.denoiser()(
        x, torch.full((2,), 1e3, dtype=torch.float64), {"label": torch.tensor([0, 1])}
    )
    assert torch.allclose(out.reshape(2, 4), back.mean, atol=1e-4)


def test_bad_statistics_and_labels_are_rejected():
    stats = GaussianStats.from_moments(torch.zeros(2, 3), torch.eye(3).expand(2, 3, 3), (3,))
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1"):
        stats.denoise(torch.zeros(1, 3), torch.ones(1), torch.tensor([5]))
    with pytest.raises(ValueError, match="per class"):
        stats.denoiser()(torch.zeros(1, 3), torch.ones(1), None)
    with pytest.raises(ValueError, match="does not hold"):
        GaussianStats.from_moments(torch.zeros(1, 3), torch.eye(3)[None], (2, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        GaussianStats.fit(torch.zeros(3, 2), torch.tensor([0, 1, 1]))


def test_teleport_then_dpmpp_2m_beats_dpmpp_2m_at_equal_nfe():
    """On a mixture, the jump replaces the early steps: with the same 4 NFE the follower's
    steps all go to sigma <= 8, and the endpoint is closer to the exact flow's."""
    mix = GaussianMixture.random(8, 4, seed=0)
    mean, cov = mix.moments()
    gaussian = GaussianStats.from_moments(mean[None], cov[None], (8,))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 8, generator=g, dtype=torch.float64) * 80
    exact = mix.flow(x, 80.0, 0.0)
    noise = RowNoise(list(range(128)))
    errors = {}
    for nfe in (5, 8):
        plain = drive(create("dpmpp_2m", x, karras_sigmas(nfe), noise), mix.denoiser())
        grid = teleport_sigmas(80.0, karras_sigmas(nfe, sigma_max=8.0))
        tele = drive(create("teleport", x, grid, noise, gaussian=gaussian), mix.denoiser())
        errors[nfe] = [((out - exact) ** 2).sum(1).mean().sqrt().item() for out in (plain, tele)]
        assert errors[nfe][1] < 0.8 * errors[nfe][0], errors


def test_teleport_costs_no_nfe_and_passes_options_on():
    mix = GaussianMixture.random(3, 2, seed=1)
    mean, cov = mix.moments()
    gaussian = GaussianStats.from_moments(mean[None], cov[None], (3,))
    calls = []

    def den(x, sigma, cond=None):
        calls.append(float(sigma[0]))
        return mix.denoise(x, sigma)

    grid = teleport_sigmas(80.0, karras_sigmas(3, sigma_max=10.0))
    x = torch.randn(2, 3, dtype=torch.float64) * 80
    drive(
        create(
            "teleport",
            x,
            grid,
            RowNoise([0, 1]),
            gaussian=gaussian,
            then="unipc",
            then_opts={"order": 3},
        ),
        den,
    )
    assert len(calls) == 3 and calls[0] == pytest.approx(10.0)
