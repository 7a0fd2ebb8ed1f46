import math

import pytest
import torch

from tempflow.math.flow import ode_step, sigma_grid
from tempflow.math.sde import gaussian_log_prob, noise_weights, sde_step, step_std


def test_noise_weight_check_values():
    w = noise_weights(sigma_grid(10, 3.0), 0.7, list(range(9)))
    expected = [1.58, 1.67, 1.21, 1.00, 0.88, 0.79, 0.72, 0.63, 0.51]
    assert [round(x, 2) for x in w.tolist()] == expected
    s = sigma_grid(10, 3.0)
    assert round(1 / step_std(s[:9], s[1:10], 0.7).mean().item(), 2) == 2.25
    assert w.mean().item() == pytest.approx(1.0)


def test_noise_weights_of_a_subset_average_one():
    w = noise_weights(sigma_grid(10, 3.0), 0.7, [0, 4, 8])
    assert w.mean().item() == pytest.approx(1.0) and w[0] > w[1] > w[2]


@pytest.mark.parametrize("t,t_next", [(1.0, 0.96), (0.79, 0.706), (0.275, 0.003)])
def test_noise_level_zero_is_the_ode_step(t, t_next):
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = sde_step(x, v, t, t_next, 0.0, noise=torch.randn_like(x))
    assert torch.equal(out.sample, ode_step(x, v, t, t_next))
    assert torch.equal(out.mean, ode_step(x, v, t, t_next))


def test_step_at_t_one_is_finite():
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = sde_step(x, v, 1.0, 0.96, 0.7, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.sample).all() and torch.isfinite(out.log_prob).all()
    assert out.std.item() == pytest.approx(0.7 * math.sqrt(1 / 0.04) * math.sqrt(0.04), rel=1e-5)


def test_mean_and_std_formula():
    x, v = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    t, tn, a = 0.6, 0.45, 0.7
    sigma = a * math.sqrt(t / (1 - t))
    dt = tn - t
    mean = x + dt * (v + sigma**2 / (2 * t) * (x + (1 - t) * v))
    out = sde_step(x, v, t, tn, a, noise=torch.zeros_like(x))
    assert torch.allclose(out.mean, mean, atol=1e-6)
    assert out.std.item() == pytest.approx(sigma * math.sqrt(-dt), rel=1e-6)


def test_log_prob_is_the_dimension_averaged_gaussian_density():
    x, v = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    out = sde_step(x, v, 0.7, 0.6, 0.7, generator=torch.Generator().manual_seed(1))
    dist = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean))
    expected = dist.log_prob(out.sample).flatten(1).mean(1)
    assert torch.allclose(out.log_prob, expected, atol=1e-5)
    again = sde_step(x, v, 0.7, 0.6, 0.7, prev=out.sample)
    assert torch.allclose(again.log_prob, out.log_prob, atol=1e-6)
    assert torch.equal(again.sample, out.sample)


def test_per_row_times_match_scalar_times():
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    noise = torch.randn_like(x)
    rows = sde_step(x, v, torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.4]), 0.7, noise=noise)
    a = sde_step(x[:1], v[:1], 0.9, 0.8, 0.7, noise=noise[:1])
    b = sde_step(x[1:], v[1:], 0.5, 0.4, 0.7, noise=noise[1:])
    assert torch.allclose(rows.sample, torch.cat([a.sample, b.sample]), atol=1e-6)
    assert torch.allclose(rows.log_prob, torch.cat([a.log_prob, b.log_prob]), atol=1e-6)


def test_low_precision_inputs_are_computed_in_float32():
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = sde_step(x.bfloat16(), v.bfloat16(), 0.7, 0.6, 0.7, noise=torch.zeros_like(x))
    assert out.sample.dtype == torch.float32 and out.log_prob.dtype == torch.float32


def test_gaussian_log_prob_of_standard_normal_at_zero():
    lp = gaussian_log_prob(torch.zeros(2, 5), torch.zeros(2, 5), torch.tensor(1.0))
    assert torch.allclose(lp, torch.full((2,), -0.5 * math.log(2 * math.pi)))
