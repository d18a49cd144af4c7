import math

import pytest
import torch

from tiltgen.core import DiscreteVP, RectifiedFlow, VPCosine, VPLinear, schedule_from_config
from tiltgen.core.schedules import ddpm_betas
from tiltgen.errors import TiltgenError

T = torch.linspace(0.02, 0.97, 41, dtype=torch.float64)


def test_derivatives_match_finite_differences(schedule):
    h = 1e-6
    t = T if not isinstance(schedule, DiscreteVP) else (torch.arange(5, 995, 37, dtype=torch.float64) + 0.5) / 1000
    for fn, d_fn in ((schedule.alpha, schedule.d_alpha), (schedule.sigma, schedule.d_sigma)):
        numeric = (fn(t + h) - fn(t - h)) / (2 * h)
        torch.testing.assert_close(d_fn(t), numeric, rtol=1e-5, atol=1e-6)


def test_boundaries_and_identities(schedule):
    zero = torch.zeros((), dtype=torch.float64)
    assert float(schedule.alpha(zero)) == pytest.approx(1.0)
    assert float(schedule.sigma(zero)) == pytest.approx(0.0, abs=1e-12)
    if schedule.family == "vp":
        torch.testing.assert_close(schedule.alpha(T) ** 2 + schedule.sigma(T) ** 2, torch.ones_like(T))
    else:
        torch.testing.assert_close(schedule.alpha(T) + schedule.sigma(T), torch.ones_like(T))
    # log-SNR strictly decreasing: samplers and the log-SNR grid rely on it
    assert bool((schedule.log_snr(T)[1:] < schedule.log_snr(T)[:-1]).all())


def test_discrete_vp_matches_diffusers_alphas_cumprod():
    # diffusers: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)**2, alphas_cumprod = cumprod(1 - betas)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    sched = DiscreteVP.from_diffusers("scaled_linear")
    k = torch.tensor([0, 1, 10, 499, 998, 999])
    t = sched.timestep_to_t(k)
    torch.testing.assert_close(sched.alpha(t) ** 2, alphas_cumprod[k], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sched.t_to_timestep(t), k.to(torch.float64))
    assert float(sched.timestep_to_t(torch.tensor(999))) == 1.0
    torch.testing.assert_close(ddpm_betas("linear", 1000, 1e-4, 0.02)[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))


def test_cosine_beta_table_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for kind in ("squaredcos_cap_v2", "scaled_linear", "linear"):
        scheduler = diffusers.DDPMScheduler(beta_schedule=kind, beta_start=0.00085, beta_end=0.012)
        torch.testing.assert_close(ddpm_betas(kind), scheduler.betas.to(torch.float64), rtol=1e-6, atol=1e-9)
    last = DiscreteVP.from_diffusers("squaredcos_cap_v2").alpha(torch.tensor(1.0, dtype=torch.float64))
    assert 0 < float(last) < 1e-4  # the betas' cap leaves alpha_T just above 0


def test_flow_shift_matches_sd3_formula_and_inverts():
    shift = 3.0
    sched = RectifiedFlow(shift=shift)
    sigma = shift * T / (1 + (shift - 1) * T)  # diffusers FlowMatchEulerDiscreteScheduler shift
    torch.testing.assert_close(sched.sigma(T), sigma)
    torch.testing.assert_close(sched.native_to_t(sigma), T)


def test_config_round_trip(schedule):
    rebuilt = schedule_from_config(schedule.config())
    torch.testing.assert_close(rebuilt.alpha(T), schedule.alpha(T))


@pytest.mark.parametrize("make", [lambda: VPLinear(beta_min=5, beta_max=1), lambda: RectifiedFlow(shift=0),
                                  lambda: DiscreteVP([0.5]), lambda: ddpm_betas("cosine"),
                                  lambda: schedule_from_config({"name": "nope"})])
def test_bad_schedule_arguments(make):
    with pytest.raises(TiltgenError):
        make()


def test_cosine_alpha_positive_at_t_max():
    s = VPCosine()
    assert float(s.alpha(torch.tensor(s.t_max, dtype=torch.float64))) > 0
    assert math.isclose(float(s.alpha(torch.tensor(1.0, dtype=torch.float64))), 0.0, abs_tol=1e-12)
