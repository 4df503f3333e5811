import math

import pytest
import torch

from engines.schedules import (
    CosineVP,
    DiscreteVP,
    LinearVP,
    ScheduleError,
    consistency_sigmas,
    edm_to_vp,
    karras_sigmas,
    lcm_sigmas,
    logsnr_sigmas,
    teleport_sigmas,
    time_uniform_sigmas,
    vp_to_edm,
)


def test_karras_matches_formula_and_ends():
    s = karras_sigmas(10, 0.002, 80.0, 7.0)
    assert len(s) == 11 and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    i = 3
    expected = (80 ** (1 / 7) + i / 9 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(expected, rel=1e-12)


def test_grid_without_zero_has_steps_plus_one_points():
    s = karras_sigmas(5, final_zero=False)
    assert len(s) == 6 and s[-1].item() == pytest.approx(0.002)
    s = logsnr_sigmas(4, 0.01, 10.0, final_zero=False)
    steps = s.log().diff()
    assert torch.allclose(steps, steps[0].expand(4))


def test_single_step_grid_is_sigma_max_then_zero():
    assert karras_sigmas(1).tolist() == [80.0, 0.0]


@pytest.mark.parametrize("bad", [dict(steps=0), dict(sigma_min=0.0), dict(sigma_min=90.0)])
def test_grid_rejects_bad_arguments(bad):
    args = dict(steps=4, sigma_min=0.002, sigma_max=80.0) | bad
    with pytest.raises(ScheduleError):
        karras_sigmas(**args)


def test_vp_edm_round_trip():
    sigma = torch.tensor([0.01, 1.0, 80.0], dtype=torch.float64)
    alpha, sigma_vp = edm_to_vp(sigma)
    assert torch.allclose(alpha**2 + sigma_vp**2, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(vp_to_edm(alpha, sigma_vp), sigma)


@pytest.mark.parametrize(
    "schedule", [LinearVP(), CosineVP(), DiscreteVP.linear(), DiscreteVP.scaled_linear()]
)
def test_time_and_sigma_are_inverse(schedule):
    t = torch.linspace(schedule.t_min, schedule.t_max, 37, dtype=torch.float64)
    assert torch.allclose(schedule.t(schedule.sigma(t)), t, atol=1e-9)


def test_linear_vp_matches_vpsde_marginal():
    sched = LinearVP(0.1, 20.0)
    t = torch.tensor(0.5, dtype=torch.float64)
    log_alpha = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
    alpha = log_alpha.exp()
    assert sched.sigma(t).item() == pytest.approx(
        (math.sqrt(1 - alpha**2) / alpha).item(), rel=1e-12
    )


def test_cosine_is_clipped_at_lambda_minus_5_1():
    assert CosineVP().sigma_max == pytest.approx(math.exp(5.1), rel=1e-6)


def test_discrete_schedule_matches_ddpm_tables():
    sched = DiscreteVP.scaled_linear()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    bars = torch.cumprod(1 - betas, 0)
    assert torch.allclose(sched.sigma(torch.tensor(500.0)), ((1 - bars[500]) / bars[500]).sqrt())
    assert sched.t(sched.sigmas[250]).item() == pytest.approx(250.0)
    # fractional timesteps interpolate log sigma
    mid = sched.sigma(torch.tensor(250.5)).log()
    assert mid.item() == pytest.approx(0.5 * (sched.log_sigmas[250] + sched.log_sigmas[251]).item())


def test_discrete_schedule_rejects_bad_tables():
    with pytest.raises(ScheduleError, match="decrease"):
        DiscreteVP(torch.tensor([0.5, 0.9]))
    with pytest.raises(ScheduleError, match="betas"):
        DiscreteVP.from_betas(torch.tensor([0.1, 1.5]))


def test_lcm_timesteps_follow_the_skipping_grid():
    sched = DiscreteVP.scaled_linear()
    assert sched.lcm_timesteps(4).tolist() == [999, 759, 499, 259]
    assert sched.lcm_timesteps(1).tolist() == [999]
    s = lcm_sigmas(sched, 2)
    assert s[-1] == 0 and s[0].item() == pytest.approx(sched.sigmas[999].item())
    with pytest.raises(ScheduleError, match=r"1\.\.50"):
        sched.lcm_timesteps(51)


def test_consistency_sigmas_pick_karras_points():
    s = consistency_sigmas([0, 22], grid_points=40)
    full = karras_sigmas(39, final_zero=False)
    assert s.tolist() == [full[0].item(), full[22].item(), 0.0]
    with pytest.raises(ScheduleError, match="increasing"):
        consistency_sigmas([22, 0])
    with pytest.raises(ScheduleError, match=r"0\.\.39"):
        consistency_sigmas([0, 40])


def test_time_uniform_grid():
    sched = LinearVP()
    s = time_uniform_sigmas(4, sched)
    assert torch.allclose(sched.t(s), torch.linspace(1.0, 1e-3, 5, dtype=torch.float64))
    with pytest.raises(ScheduleError):
        time_uniform_sigmas(4, sched, t_min=0.5, t_max=0.2)


def test_teleport_grid_prepends_sigma_max():
    s = teleport_sigmas(80.0, karras_sigmas(3, sigma_max=10.0))
    assert s[0] == 80.0 and s[1].item() == pytest.approx(10.0)
    with pytest.raises(ScheduleError, match="below"):
        teleport_sigmas(5.0, karras_sigmas(3, sigma_max=10.0))
