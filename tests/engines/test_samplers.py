"""Samplers on closed-form data: convergence orders, exact cases, identities, batching, errors."""

import itertools
import math

import pytest
import torch

from engines.analytic import GaussianMixture
from engines.denoisers import CFGDenoiser
from engines.gaussian import GaussianStats
from engines.noise import RowNoise
from engines.samplers import INFO, SAMPLERS, SamplerError, create, drive, drive_many
from engines.schedules import karras_sigmas, logsnr_sigmas

ROWS, DIM = 16, 6


def seeds(n=ROWS, start=0):
    return RowNoise(list(range(start, start + n)))


@pytest.fixture(scope="module")
def gaussian() -> GaussianStats:
    g = torch.Generator().manual_seed(0)
    lam = torch.tensor([0.02, 0.1, 0.3, 1.0, 2.0, 4.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    mean = torch.randn(DIM, generator=g, dtype=torch.float64)
    return GaussianStats.from_moments(mean[None], (q @ torch.diag(lam) @ q.T)[None], (DIM,))


ORDER_CASES = [
    ("euler", {}, 1),
    ("heun", {}, 2),
    ("dpmpp_2m", {"lower_order_final": False}, 2),
    ("dpmpp_2s", {}, 2),
    ("deis", {"lower_order_final": False}, 2),
    ("dpmpp_3m", {"lower_order_final": False}, 3),
    ("unipc", {"order": 1, "lower_order_final": False}, 2),
    ("unipc", {"order": 2, "lower_order_final": False}, 3),
    ("unipc", {"order": 2, "variant": "bh1", "lower_order_final": False}, 3),
    ("unipc", {"order": 3, "lower_order_final": False}, 4),
]


@pytest.mark.parametrize(("name", "opts", "order"), ORDER_CASES)
def test_convergence_order(gaussian, name, opts, order):
    """Global error against the exact Gaussian flow, N = 10..160, log-SNR steps.

    The grid ends at sigma 0.2 > 0 so the last step keeps the order under test, and starts
    at sigma 80, far above the data scale, where x0(lambda) is nearly flat: there the
    first-order warm-up step of the multistep methods costs less than their own
    truncation error (started at sigma 10, that warm-up error caps 3M at order 2).
    """
    sigma_max, sigma_min = 80.0, 0.2
    g = torch.Generator().manual_seed(5)
    x = torch.randn(ROWS, DIM, generator=g, dtype=torch.float64) * sigma_max
    exact = gaussian.flow(x, sigma_max, sigma_min)
    errors = []
    for n in (10, 20, 40, 80, 160):
        sigmas = logsnr_sigmas(n, sigma_min, sigma_max, final_zero=False)
        out = drive(create(name, x, sigmas, seeds(), **opts), gaussian.denoiser())
        errors.append((out - exact).abs().max().item())
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert math.log2(errors[-2] / errors[-1]) == pytest.approx(order, abs=0.2), errors


@pytest.mark.parametrize(
    "name", ["euler", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "dpmpp_2s", "heun"]
)
def test_one_step_is_exact_on_delta_data(name):
    """A point mass has a constant x0, so DDIM-type steps land on it from anywhere."""
    target = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)

    def delta(x, sigma, cond=None):
        return target.expand_as(x)

    x = torch.randn(4, 3, dtype=torch.float64) * 80
    sigmas = karras_sigmas(max(1, INFO[name].min_steps({})))
    out = drive(create(name, x, sigmas, seeds(4)), delta)
    assert torch.allclose(out, target.expand(4, 3), atol=1e-12)


def test_ddim_one_step_to_a_positive_sigma_is_exact_on_delta_data():
    target = torch.full((2, 3), 0.7, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64) * 10
    sigmas = torch.tensor([10.0, 2.0], dtype=torch.float64)
    out = drive(create("euler", x, sigmas, seeds(2)), lambda x, s, c=None: target)
    # the exact flow of a delta: x(s) = x0 + (s / s_T)(x_T - x0)
    assert torch.allclose(out, target + 0.2 * (x - target), atol=1e-13)


def test_ddpm_is_the_posterior_and_equals_eta_1_samplers(gaussian):
    x = torch.randn(ROWS, DIM, dtype=torch.float64) * 80
    sigmas = karras_sigmas(6)
    den = gaussian.denoiser()
    ddpm = drive(create("ddpm", x, sigmas, seeds()), den)
    ancestral = drive(create("euler_ancestral", x, sigmas, seeds()), den)
    sde = drive(create("dpmpp_sde", x, sigmas, seeds(), eta=1.0), den)
    assert torch.allclose(ddpm, ancestral, atol=1e-12) and torch.equal(ddpm, sde)

    # one posterior step by hand: mean (s'^2/s^2) x + (1 - s'^2/s^2) x0, std s' sqrt(1 - s'^2/s^2)
    s, s_next = 5.0, 2.0
    noise = seeds()
    gen = create("ddpm", x, torch.tensor([s, s_next, 0.0], dtype=torch.float64), noise)
    x_in, _ = next(gen)
    x0 = den(x_in, torch.full((ROWS,), s, dtype=torch.float64))
    got, _ = gen.send(x0)
    r = (s_next / s) ** 2
    z = seeds().like(x)
    assert torch.allclose(got, r * x + (1 - r) * x0 + s_next * math.sqrt(1 - r) * z, atol=1e-12)


@pytest.mark.parametrize(("name", "opts"), [("dpmpp_sde", {"eta": 0.0}), ("tcd", {"gamma": 0.0})])
def test_zero_noise_limits_are_ddim(gaussian, name, opts):
    x = torch.randn(ROWS, DIM, dtype=torch.float64) * 80
    sigmas = karras_sigmas(5)
    ddim = drive(create("euler", x, sigmas, seeds()), gaussian.denoiser())
    other = drive(create(name, x, sigmas, seeds(), **opts), gaussian.denoiser())
    assert torch.allclose(ddim, other, atol=1e-12)


def test_consistency_samplers_with_the_exact_consistency_function():
    """With f = the exact flow map to sigma 0, one CM step is the exact ODE sample and
    re-noised steps keep samples on the data distribution."""
    mix = GaussianMixture.random(2, 2, seed=3)

    def f(x, sigma, cond=None):
        return mix.flow(x, float(sigma[0]), 0.0, rtol=1e-9)

    x = torch.randn(8, 2, dtype=torch.float64) * 80
    one = drive(create("cm_multistep", x, karras_sigmas(1), seeds(8)), f)
    assert torch.allclose(one, f(x, torch.full((8,), 80.0)), atol=1e-7)
    gen = create("lcm", x, torch.tensor([80.0, 3.0, 0.0], dtype=torch.float64), seeds(8))
    x_in, sigma = next(gen)
    x1, sigma1 = gen.send(f(x_in, torch.full((8,), sigma)))
    assert sigma1 == 3.0
    z = seeds(8).like(x)
    assert torch.allclose(x1, one + 3.0 * z)


def test_heun_churn_adds_noise_only_when_asked(gaussian):
    x = torch.randn(ROWS, DIM, dtype=torch.float64) * 80
    sigmas = karras_sigmas(4)
    den = gaussian.denoiser()
    plain = drive(create("heun", x, sigmas, seeds()), den)
    churned = drive(create("heun", x, sigmas, seeds(), s_churn=10.0), den)
    again = drive(create("heun", x, sigmas, seeds(), s_churn=10.0), den)
    assert not torch.allclose(plain, churned) and torch.equal(churned, again)


@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - {"teleport", "euler_cfgpp"}))
def test_a_request_is_bitwise_identical_alone_and_in_a_batch(name):
    """Step-level batching: other requests (other samplers, steps, seeds) share the
    forward passes, yet each request's output is bitwise what it gets alone."""
    mix = GaussianMixture.random(DIM, 3, seed=2)
    den = mix.denoiser()
    x = torch.randn(3, DIM, dtype=torch.float64) * 80
    steps = max(4, INFO[name].min_steps({}))
    alone = drive(create(name, x, karras_sigmas(steps), seeds(3, 100)), den)
    others = [
        create(
            "dpmpp_2m", torch.randn(5, DIM, dtype=torch.float64) * 80, karras_sigmas(7), seeds(5, 7)
        ),
        create(
            "ddpm", torch.randn(2, DIM, dtype=torch.float64) * 80, karras_sigmas(3), seeds(2, 9)
        ),
    ]
    mine = create(name, x, karras_sigmas(steps), seeds(3, 100))
    results = drive_many([others[0], mine, others[1]], den)
    assert torch.equal(results[1], alone)


def test_float32_rows_are_batch_invariant_too():
    mix = GaussianMixture.random(DIM, 3, seed=2)
    x = (torch.randn(2, DIM) * 80).to(torch.float32)
    alone = drive(create("dpmpp_2m", x, karras_sigmas(5), seeds(2)), mix.denoiser())
    other = create("euler", torch.randn(6, DIM) * 80, karras_sigmas(5), seeds(6, 50))
    batched = drive_many([other, create("dpmpp_2m", x, karras_sigmas(5), seeds(2))], mix.denoiser())
    assert alone.dtype == torch.float32 and torch.equal(batched[1], alone)


BAD = [
    ("nope", karras_sigmas(4), {}, "unknown sampler 'nope'"),
    ("euler", karras_sigmas(4), {"eta": 1.0}, "has no option 'eta'; its options are none"),
    (
        "dpmpp_2m",
        karras_sigmas(4),
        {"order": 3},
        "its options are \\['lower_order_final', 'orders'\\]",
    ),
    ("dpmpp_3m", karras_sigmas(2), {}, "needs at least 3 steps, got 2"),
    ("dpmpp_2m", karras_sigmas(1), {}, "needs at least 2 steps"),
    ("unipc", karras_sigmas(2), {"order": 3}, "needs at least 3 steps"),
    ("euler", torch.tensor([1.0, 5.0, 0.0], dtype=torch.float64), {}, "strictly decreasing"),
    ("euler", torch.tensor([5.0], dtype=torch.float64), {}, "at least 2 noise levels"),
    ("euler", torch.tensor([5.0, -1.0], dtype=torch.float64), {}, "positive"),
    ("euler", torch.tensor([math.inf, 1.0], dtype=torch.float64), {}, "finite"),
    ("euler", [80.0, 0.0], {}, "1-D tensor"),
    ("teleport", karras_sigmas(3), {"then": "teleport"}, "another sampler"),
    ("teleport", karras_sigmas(2), {"then": "dpmpp_3m"}, "needs at least 4 steps"),
]


@pytest.mark.parametrize(("name", "sigmas", "opts", "message"), BAD)
def test_bad_arguments_are_rejected_before_running(name, sigmas, opts, message):
    with pytest.raises(SamplerError, match=message):
        create(name, torch.zeros(2, 3), sigmas, seeds(2), **opts)


VALUE_ERRORS = [
    ("unipc", {"order": 4}, "order must be one of"),
    ("unipc", {"variant": "bh3"}, "'bh1' or 'bh2'"),
    ("deis", {"order": 3}, "order must be one of"),
    ("heun", {"s_churn": -1.0}, "s_churn must be >= 0"),
    ("dpmpp_sde", {"eta": 2.0}, "eta must be in"),
    ("euler_ancestral", {"eta": -0.5}, "eta must be in"),
    ("tcd", {"gamma": 1.5}, "gamma must be in"),
    ("cm_multistep", {"sigma_min": -1.0}, "sigma_min must be >= 0"),
    ("teleport", {}, "teleport needs gaussian="),
]


@pytest.mark.parametrize(("name", "opts", "message"), VALUE_ERRORS)
def test_bad_option_values_fail_at_the_first_step(name, opts, message):
    gen = create(name, torch.zeros(2, 3), karras_sigmas(4), seeds(2), **opts)
    with pytest.raises(SamplerError, match=message):
        next(gen)


def test_noise_rows_must_match_x():
    with pytest.raises(SamplerError, match="2 rows but noise has seeds for 3"):
        create("euler", torch.zeros(2, 3), karras_sigmas(2), seeds(3))


def test_every_sampler_is_registered_with_a_docstring():
    assert set(SAMPLERS) == {
        "euler", "euler_cfgpp", "heun", "dpmpp_2m", "dpmpp_3m", "dpmpp_2s", "unipc", "deis", "ddpm",
        "dpmpp_sde", "euler_ancestral", "cm_multistep", "lcm", "tcd", "teleport",
    }  # fmt: skip
    for name, fn in SAMPLERS.items():
        assert fn.__doc__ and fn.__name__ == name


def class_conditional_mixture():
    """Label k denoises with component k's Gaussian; the null label (K) with the mixture.

    Every part is a GaussianMixture, whose denoiser is row-wise exact (no GEMM), so batch
    invariance here is the samplers' and the CFG wrapper's, not a BLAS kernel's.
    """
    mix = GaussianMixture.random(DIM, 3, seed=4)
    parts = [
        GaussianMixture(torch.ones(1), mix.means[k : k + 1], mix.covs[k : k + 1]) for k in range(3)
    ]

    def inner(x, sigma, cond):
        labels = cond["label"]
        out = mix.denoise(x, sigma)
        for k, part in enumerate(parts):
            rows = labels == k
            if rows.any():
                out[rows] = part.denoise(x[rows], sigma[rows])
        return out

    return mix, inner


def test_cfgpp_renoises_along_the_unconditional_direction():
    mix, inner = class_conditional_mixture()
    x = torch.randn(4, DIM, dtype=torch.float64) * 80
    sigmas = karras_sigmas(6)
    cond = {
        "label": torch.tensor([0, 1, 2, 0]),
        "guidance_scale": torch.tensor([0.0, 0.3, 0.6, 1.0], dtype=torch.float64),
    }
    den = CFGDenoiser(inner, null_label=3, cfg_pp=True)
    out = drive(create("euler_cfgpp", x, sigmas, seeds(4)), den, cond)
    # lambda 0 is plain DDIM on the unconditional model
    uncond = drive(create("euler", x[:1], sigmas, seeds(1)), mix.denoiser())
    assert torch.allclose(out[:1], uncond, atol=1e-12)
    # one step by hand: x' = x0_lambda + (s'/s)(x - x0_uncond)
    gen = create("euler_cfgpp", x, sigmas, seeds(4))
    x_in, s = next(gen)
    guided = den(x_in, torch.full((4,), s, dtype=torch.float64), cond)
    x1, s1 = gen.send(guided)
    assert torch.allclose(x1, guided.x0 + (s1 / s) * (x - guided.x0_uncond))
    # guided rows share forward passes with others and stay bitwise the same
    other = create("euler_cfgpp", x[1:], sigmas, seeds(3, 40))
    mine = create("euler_cfgpp", x[:2], sigmas, seeds(2))
    sub_cond = {k: v[:2] for k, v in cond.items()}
    rest = {k: v[1:] for k, v in cond.items()}
    batched = drive_many([other, mine], den, [rest, sub_cond])
    assert torch.equal(
        batched[1], drive(create("euler_cfgpp", x[:2], sigmas, seeds(2)), den, sub_cond)
    )


def test_cfgpp_sampler_needs_a_cfgpp_denoiser():
    gen = create("euler_cfgpp", torch.zeros(1, 2), karras_sigmas(2), seeds(1))
    with pytest.raises(SamplerError, match="cfg_pp=True"):
        drive(gen, lambda x, s, c=None: x)
