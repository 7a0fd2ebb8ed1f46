import math

import numpy as np
import pytest
import torch

from tempflow.math.advantages import group_advantages, group_ids
from tempflow.math.losses import kl_loss, policy_loss


def test_hand_computed_prompt_groups():
    r = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.2, 0.2, 0.9, 0.1])
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    a = group_advantages(r, g)
    m, s = 0.5, np.std([1.0, 0.0, 0.5])
    expected0 = [(1 - m) / (s + 1e-4), (0 - m) / (s + 1e-4), 0.0]
    assert a.values[:3].tolist() == pytest.approx(expected0, abs=1e-5)
    assert a.values[3:6].tolist() == [0, 0, 0] and not a.valid[3:6].any()
    assert a.values[6:].tolist() == pytest.approx([0.4 / (0.4 + 1e-4), -0.4 / (0.4 + 1e-4)], abs=1e-5)
    assert a.zero_std_frac == pytest.approx(1 / 3)


def test_global_std_uses_all_valid_rows():
    r = torch.tensor([1.0, 0.0, 3.0, 1.0])
    g = torch.tensor([0, 0, 1, 1])
    a = group_advantages(r, g, std="pooled")
    dev = np.array([0.5, -0.5, 1.0, -1.0])
    std = math.sqrt((dev**2).mean())
    assert a.values.tolist() == pytest.approx((dev / (std + 1e-4)).tolist(), abs=1e-5)


def test_clipping_and_nonfinite_groups():
    r = torch.tensor([100.0] + [0.0] * 99 + [float("nan"), 1.0, float("inf"), 0.0])
    g = torch.tensor([0] * 100 + [1, 1, 2, 2])
    a = group_advantages(r, g, clip=5.0)
    assert a.values[0] == 5.0
    assert not a.valid[100:].any() and torch.all(a.values[100:] == 0)
    assert a.nonfinite_frac == pytest.approx(2 / 3)
    assert torch.isfinite(a.values).all()


def test_seed_group_ids():
    prompt = torch.tensor([0, 0, 0, 0, 1, 1])
    seed = torch.tensor([0, 0, 1, 1, 0, 0])
    step = torch.tensor([3, 3, 3, 3, 3, 4])
    ids = group_ids(prompt, seed, step)
    assert ids[0] == ids[1] and ids[2] == ids[3] and ids[0] != ids[2] and ids[4] != ids[5]


def test_policy_loss_on_policy_and_clipping():
    lp = torch.tensor([-1.0, -2.0])
    adv = torch.tensor([1.0, -1.0])
    out = policy_loss(lp, lp.clone(), adv, clip_range=1e-4)
    assert torch.all(out.ratio == 1) and out.clip_frac == 0
    assert out.loss.item() == pytest.approx(0.0)
    # ratio far above 1 + eps with a positive advantage: the clipped (flat) branch is taken
    out = policy_loss(torch.tensor([0.1]), torch.tensor([0.0]), torch.tensor([2.0]), 0.2)
    assert out.loss.item() == pytest.approx(-2.0 * math.exp(0.1))  # min(r, 1.2) * A with r = 1.105
    out = policy_loss(torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([2.0]), 0.2)
    assert out.loss.item() == pytest.approx(-2.0 * 1.2) and out.clip_frac == 1
    w = torch.tensor([2.0, 0.5])
    out = policy_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, 1.0]), 0.1, weights=w)
    assert out.loss.item() == pytest.approx(-(2.0 + 0.5) / 2)


def test_kl_loss():
    mean = torch.zeros(2, 3, 2, 2)
    ref = torch.ones(2, 3, 2, 2)
    std = torch.tensor([1.0, 2.0])
    assert kl_loss(mean, ref, std).item() == pytest.approx((1 / 2 + 1 / 8) / 2)
    assert kl_loss(mean, mean, std).item() == 0
