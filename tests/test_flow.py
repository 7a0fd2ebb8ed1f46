import pytest
import torch

from tempflow.math.flow import (
    flow_matching_loss,
    interpolate,
    logit_normal_t,
    ode_step,
    sigma_grid,
    velocity_target,
)


def test_sigma_grid_check_values():
    s = sigma_grid(10, 3.0)
    expected = [1, 0.960, 0.913, 0.857, 0.790, 0.706, 0.601, 0.463, 0.275, 0.003, 0]
    assert s.shape == (11,)
    assert s.dtype == torch.float32
    assert torch.allclose(s, torch.tensor(expected), atol=5e-4)


def test_sigma_grid_monotone_and_ends():
    for n, shift in [(1, 1.0), (4, 1.0), (40, 3.0), (50, 7.5)]:
        s = sigma_grid(n, shift)
        assert len(s) == n + 1 and s[0] == 1 and s[-1] == 0
        assert torch.all(s[1:] < s[:-1])


def test_sigma_grid_shift_one_is_linear():
    assert torch.allclose(sigma_grid(4, 1.0)[:-1], torch.linspace(1, 1 / 1000, 4))


@pytest.mark.parametrize("n,shift", [(0, 3.0), (10, 0.0)])
def test_sigma_grid_rejects_bad_arguments(n, shift):
    with pytest.raises(ValueError):
        sigma_grid(n, shift)


def test_interpolation_convention():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(interpolate(x0, eps, 0.0), x0)
    assert torch.equal(interpolate(x0, eps, 1.0), eps)
    t = torch.tensor([0.25, 0.75])
    xt = interpolate(x0, eps, t)
    assert torch.allclose(xt[1], 0.25 * x0[1] + 0.75 * eps[1])


def test_exact_velocity_ode_step_recovers_data():
    # on a straight path, one Euler step with the true velocity lands exactly on x0
    x0, eps = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    x = ode_step(eps, velocity_target(x0, eps), 1.0, 0.0)
    assert torch.allclose(x, x0, atol=1e-6)
    assert flow_matching_loss(velocity_target(x0, eps), x0, eps) == 0


def test_logit_normal_range_and_determinism():
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a, b = logit_normal_t(1000, generator=g1), logit_normal_t(1000, generator=g2)
    assert torch.equal(a, b)
    assert (a > 0).all() and (a < 1).all()
    assert abs(a.median().item() - 0.5) < 0.05
