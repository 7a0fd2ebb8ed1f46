"""The likelihood-free losses, GRPO-Guard's ratio and the DPM-Solver++ rollouts, pinned by the check
values of docs/method.md (computed by hand)."""

import math

import pytest
import torch

from tempflow.math.flow import interpolate, sigma_grid
from tempflow.math.losses import (
    anchored_loss,
    awm_log_prob,
    flow_matching_error,
    guard_log_ratio,
    nft_loss,
    nft_reward,
    normalised_x0_error,
    old_policy_decay,
)
from tempflow.math.sde import gaussian_log_prob, sde_step
from tempflow.sampling import solve

X0, EPS, T = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([0.5])


def test_nft_toy_check_values():
    v_old, v = torch.tensor([[0.2, 0.4]]), torch.tensor([[0.3, 0.1]])
    x_t = interpolate(X0, EPS, T)
    assert x_t.tolist() == [[0.75, -0.25]]
    # the normalisers: mean |x0_hat - x0| of the positive (v+ = v) and the negative (v- = 2 v_old - v) policy
    assert (x_t - 0.5 * v - X0).abs().mean().item() == pytest.approx(0.55)
    assert (x_t - 0.5 * (2 * v_old - v) - X0).abs().mean().item() == pytest.approx(0.35)
    loss, pos, neg = nft_loss(v, v_old, x_t, X0, T, nft_reward(torch.tensor([2.5])), beta=1.0)
    assert pos.item() == pytest.approx(0.590909, abs=1e-6) and neg.item() == pytest.approx(0.357143, abs=1e-6)
    assert loss.item() == pytest.approx(2.662338, abs=1e-6)


def test_nft_reward_mapping():
    r = nft_reward(torch.tensor([-7.0, -2.5, 0.0, 1.0, 5.0]))
    assert r.tolist() == pytest.approx([0.0, 0.25, 0.5, 0.6, 1.0])


@pytest.mark.parametrize("decay_type,steps,expected", [(1, [0, 100, 499, 500], [0, 0.1, 0.499, 0.5]),
                                                       (2, [74, 75, 100, 208], [0, 0, 0.1875, 0.9975]),
                                                       (0, [0, 1000], [0, 0])])
def test_old_policy_decay_schedules(decay_type, steps, expected):
    assert [old_policy_decay(s, decay_type) for s in steps] == pytest.approx(expected)
    with pytest.raises(ValueError, match="decay_type"):
        old_policy_decay(0, 3)


def test_nft_gradient_at_the_old_policy_is_advantage_weighted_flow_matching_whatever_beta():
    """At v = v_old the gradient in v is clip(A) t grad mean((v - u)^2) / mean|v_old - u| for every beta."""
    gen = torch.Generator().manual_seed(0)
    x0, eps, v_old = (torch.randn(3, 8, generator=gen) for _ in range(3))
    t, adv = torch.tensor([0.3, 0.6, 0.9]), torch.tensor([2.0, -1.0, 7.0])
    x_t, u = interpolate(x0, eps, t), eps - x0
    expected = adv.clamp(-5, 5)[:, None] * t[:, None] * 2 * (v_old - u) / 8 / (v_old - u).abs().mean(1, keepdim=True)
    for beta in (1.0, 0.1):
        v = v_old.clone().requires_grad_(True)
        loss, _, _ = nft_loss(v, v_old, x_t, x0, t, nft_reward(adv), beta)
        (grad,) = torch.autograd.grad(loss.sum(), v)
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_normalised_error_has_a_floor():
    x0 = torch.zeros(1, 4)
    assert normalised_x0_error(x0, x0).item() == 0.0  # no division by zero: the normaliser is at least 1e-5
    assert normalised_x0_error(torch.full((1, 4), 2.0), x0).item() == pytest.approx(4.0 / 2.0)


def test_awm_check_values():
    err = flow_matching_error(torch.tensor([[0.2, 0.4]]), X0, EPS)
    assert err.item() == pytest.approx(0.85)
    assert awm_log_prob(err, T).item() == pytest.approx(-1.914045, abs=1e-6)
    # p = 1 and no floor: the plain -l t
    assert awm_log_prob(err, T, p=1.0, floor=0.0).item() == pytest.approx(-0.425)


def test_anchored_gradient_check_value():
    """x0 = (1, 0), (0, 1); A = (1, -1); sigma_k = 0.5; K = 2: dL/dv = (2, -2), whatever v and x_k."""
    v = torch.tensor([0.3, -0.7], requires_grad=True)
    x_k = torch.tensor([0.4, 0.9])
    x0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    per_child = anchored_loss(v.expand(2, 2), x_k.expand(2, 2), x0, torch.tensor([1.0, -1.0]), torch.full((2,), 0.5))
    (grad,) = torch.autograd.grad(per_child.mean(), v)
    assert grad.tolist() == pytest.approx([2.0, -2.0])


def test_guard_log_ratio_is_the_scaled_ratio_without_its_bias():
    """log r_guard = mean(z (mu - mu_old)) = std * log r + mean((mu - mu_old)^2) / (2 std)."""
    gen = torch.Generator().manual_seed(1)
    x, v_old, v = (torch.randn(4, 3, 2, 2, generator=gen) for _ in range(3))
    old = sde_step(x, v_old, 0.8, 0.6, 0.7, generator=gen)
    new = sde_step(x, v, 0.8, 0.6, 0.7, prev=old.sample)
    guard = guard_log_ratio(old.sample, new.mean, old.mean, new.std)
    plain = new.log_prob - old.log_prob
    shift = (new.mean - old.mean).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(guard, new.std * plain + shift / (2 * new.std), rtol=1e-4, atol=1e-5)
    z = (old.sample - old.mean) / old.std
    torch.testing.assert_close(guard, (z * (new.mean - old.mean)).flatten(1).mean(1))
    assert torch.equal(guard_log_ratio(old.sample, old.mean, old.mean, old.std), torch.zeros(4))  # on-policy: 1
    assert gaussian_log_prob(old.sample, old.mean, old.std.expand_as(old.mean)).shape == (4,)


def _gaussian_velocity(var: float):
    """The exact velocity of data N(0, var I): v = (x - E[x0 | x_t]) / t."""
    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = float(t)
        return (x - (1 - t) * var / ((1 - t) ** 2 * var + t**2) * x) / t
    return v


def test_solvers_on_exact_flows():
    sig = sigma_grid(10, 3.0)
    x0, eps = torch.randn(5, 3), torch.randn(5, 3)
    straight = lambda x, t: (x - x0) / t  # noqa: E731  (one data point: every solver is exact)
    for solver in ("euler", "dpm2"):
        torch.testing.assert_close(solve(straight, eps, sig, solver), x0)
    fine = solve(_gaussian_velocity(0.25), eps, sigma_grid(4000, 3.0), "euler")
    errors = [(solve(_gaussian_velocity(0.25), eps, sigma_grid(n, 3.0), "dpm2") - fine).abs().max() for n in (10, 40)]
    assert errors[1] < errors[0] / 3  # converges, faster than first order from 10 to 40 steps
    with pytest.raises(ValueError, match="solver"):
        solve(straight, eps, sig, "heun")


def test_euler_solver_is_the_ode_sampler(tiny_model):
    from tempflow.sampling import ode_sample

    cond = tiny_model.encode_prompts(["a red circle", "two squares"])
    noise = torch.randn(2, *tiny_model.latent_shape())
    sig = tiny_model.sigmas(6)
    with torch.no_grad():
        ours = solve(lambda x, t: tiny_model.velocity(x, t.expand(2), cond, 3.0), noise, sig, "euler")
        assert torch.equal(ours, ode_sample(tiny_model, noise, cond, 6, 3.0))
    assert not math.isnan(float(ours.sum()))
