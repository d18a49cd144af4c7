"""Samplers on exact Gaussian models: moments, seeding, equivalences."""

import pytest
import torch

from tiltgen.backends import GaussianMixture
from tiltgen.core import SAMPLERS, RectifiedFlow, VPLinear, sample, time_grid
from tiltgen.errors import TiltgenError

GAUSS = GaussianMixture(torch.ones(1), torch.tensor([[1.5, -0.5]]), torch.tensor([[[0.5, 0.2], [0.2, 0.8]]]))
FAMILIES = {"vp": (VPLinear(), "eps", "logsnr"), "flow": (RectifiedFlow(), "velocity", "uniform")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("sampler,steps,tol", [("heun", 30, 0.06), ("euler", 200, 0.08), ("ddim", 100, 0.06),
                                               ("ddpm", 200, 0.08), ("sde", 400, 0.1)])
def test_sampler_reaches_the_data_moments(family, sampler, steps, tol):
    s, kind, spacing = FAMILIES[family]
    x = sample(GAUSS.model(s, kind), s, shape=(2,), n=3000, steps=steps, sampler=sampler, spacing=spacing,
               dtype=torch.float64, progress=False)
    torch.testing.assert_close(x.mean(0), GAUSS.means[0], atol=tol, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), GAUSS.covs[0], atol=2 * tol, rtol=0)


@pytest.mark.parametrize("sampler", ["heun", "ddpm", "sde"])
def test_a_sample_depends_on_its_seed_not_its_batch(sampler):
    s = RectifiedFlow()
    model = GAUSS.model(s, "velocity")
    batch = sample(model, s, shape=(2,), seeds=[10, 11, 12, 13, 14], steps=8, sampler=sampler, progress=False)
    alone = sample(model, s, shape=(2,), seeds=[12], steps=8, sampler=sampler, progress=False)
    subset = sample(model, s, shape=(2,), seeds=[14, 12], steps=8, sampler=sampler, progress=False)
    torch.testing.assert_close(alone[0], batch[2])
    torch.testing.assert_close(subset, batch[[4, 2]])


def test_ddim_is_euler_for_rectified_flow():
    s = RectifiedFlow()
    model = GAUSS.model(s, "velocity")
    a = sample(model, s, shape=(2,), n=50, steps=10, sampler="ddim", dtype=torch.float64, progress=False)
    b = sample(model, s, shape=(2,), n=50, steps=10, sampler="euler", dtype=torch.float64, progress=False)
    torch.testing.assert_close(a, b)


def test_callback_sees_every_step_and_can_replace_state():
    s = RectifiedFlow()
    seen = []

    def callback(info):
        seen.append((info.index, info.t, info.t_next))
        return torch.zeros_like(info.x_next) if info.t_next == 0 else None

    x = sample(GAUSS.model(s, "velocity"), s, shape=(2,), n=4, steps=5, callback=callback, progress=False)
    assert [i for i, _, _ in seen] == list(range(5))
    assert seen[0][1] == 1.0 and seen[-1][2] == 0.0
    assert bool((x == 0).all())


def test_time_grids():
    for spacing in ("uniform", "logsnr"):
        grid = time_grid(VPLinear(), 20, spacing)
        assert len(grid) == 21 and grid[0] == 1.0 and grid[-1] == 0.0
        assert bool((grid[1:] < grid[:-1]).all())


def test_bad_sampler_input():
    s = RectifiedFlow()
    model = GAUSS.model(s, "velocity")
    with pytest.raises(TiltgenError, match="unknown sampler 'rk4'"):
        sample(model, s, shape=(2,), n=2, sampler="rk4")
    with pytest.raises(TiltgenError, match="steps must be >= 1"):
        sample(model, s, shape=(2,), n=2, steps=0)
    with pytest.raises(TiltgenError, match="needs either x_init or shape"):
        sample(model, s, n=2)
    with pytest.raises(TiltgenError, match="n=3 but 2 seeds"):
        sample(model, s, shape=(2,), n=3, seeds=[1, 2])
    with pytest.raises(TiltgenError, match="strictly decreasing"):
        sample(model, s, shape=(2,), n=2, times=torch.tensor([0.0, 1.0]))
    with pytest.raises(TiltgenError, match="model returned shape"):
        sample(lambda x, t, c: x[:, :1], s, shape=(2,), n=2, progress=False) if False else \
            sample(type("M", (), {"prediction": "eps", "__call__": lambda self, x, t, c: x[:, :1]})(), s, shape=(2,), n=2,
                   progress=False)
    assert set(SAMPLERS) == {"euler", "heun", "ddim", "ddpm", "sde"}
