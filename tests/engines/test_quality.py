"""Quality harness: Frechet distance against closed forms, grids, NFE bookkeeping."""

import pytest
import scipy.linalg
import torch

from engines.quality import Gaussian, frechet_distance, steps_for_nfe


def random_cov(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mu_a, mu_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    sd_a, sd_b = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([2.0, 2.0, 1.5])
    a, b = Gaussian(mu_a, torch.diag(sd_a**2)), Gaussian(mu_b, torch.diag(sd_b**2))
    expected = (mu_a - mu_b).square().sum() + (sd_a - sd_b).square().sum()
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_with_non_commuting_covariances_matches_scipy():
    ca, cb = random_cov(6, 0), random_cov(6, 1)
    mu_a, mu_b = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    cross = scipy.linalg.sqrtm(ca.numpy() @ cb.numpy()).real.trace()
    expected = 6 + float(ca.trace() + cb.trace()) - 2 * cross
    assert frechet_distance(Gaussian(mu_a, ca), Gaussian(mu_b, cb)) == pytest.approx(expected)


def test_sample_statistics_approach_the_population_distance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 4, generator=g, dtype=torch.float64) * 2 + 1
    # population: |1|^2 * 4 + (2 - 1)^2 * 4 = 8
    assert frechet_distance(Gaussian.of(a), Gaussian.of(b)) == pytest.approx(8.0, rel=0.03)


def test_heun_steps_for_an_nfe_budget():
    assert steps_for_nfe("heun", 35) == 18
    assert steps_for_nfe("heun", 4) is None
    assert steps_for_nfe("dpmpp_2m", 4) == 4
