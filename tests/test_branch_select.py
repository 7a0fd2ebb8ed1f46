"""Branch points drawn where the rewards spread: the running estimate, the draw, and its state."""

import random

import pytest
import torch

from tempflow.algorithms.tempflow_grpo import TempFlowConfig, pick_branch_points, update_spread
from tempflow.config import load_config
from tempflow.errors import ConfigError
from tempflow.math.advantages import group_ids
from tempflow.training.config import TrainConfig
from tempflow.training.loop import Trainer


def test_update_spread_hand_computed():
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.2, 0.4, float("nan"), 3.0])
    step = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2])
    seed = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    group = group_ids(torch.zeros(8, dtype=torch.long), seed, step)
    out = update_spread(torch.ones(4), rewards, step, group, decay=0.5)
    # step 0: groups {0, 1} std 0.5 and {0.5, 0.5} std 0 -> 0.25; step 2: {0.2, 0.4} std 0.1, {3.0} std 0 -> 0.05
    assert out.tolist() == pytest.approx([0.5 * 1 + 0.5 * 0.25, 1.0, 0.5 * 1 + 0.5 * 0.05, 1.0])


def test_variance_draw_follows_the_estimate():
    cfg = TempFlowConfig(branch_sample=2, branch_select="variance", branch_floor=0.01)
    spread = torch.tensor([1.0, 0.8, 0, 0, 0, 0, 0, 0, 0, 0])
    counts = {j: 0 for j in range(9)}
    rng = random.Random(0)
    for _ in range(200):
        pts = pick_branch_points(cfg, 10, rng, spread)
        assert len(pts) == 2 and len(set(pts)) == 2 and pts == sorted(pts)
        for j in pts:
            counts[j] += 1
    assert counts[0] > 170 and counts[1] > 150 and sum(counts[j] for j in range(2, 9)) < 80
    assert pick_branch_points(cfg, 10, random.Random(3), spread) == pick_branch_points(cfg, 10, random.Random(3),
                                                                                          spread)
    uniform = TempFlowConfig(branch_sample=2)
    assert pick_branch_points(uniform, 10, random.Random(3), spread) == sorted(random.Random(3).sample(range(9), 2))


def test_bad_branch_select_is_refused():
    with pytest.raises(ConfigError, match="branch_select"):
        load_config(TrainConfig, "configs/shapes/tempflow.yaml", ["algorithm.branch_select=often"])
    with pytest.raises(ConfigError, match="branch_floor"):
        load_config(TrainConfig, "configs/shapes/tempflow.yaml", ["algorithm.branch_floor=0"])


def test_spread_is_learned_and_checkpointed(tiny_model_dir, tmp_path):
    over = [f"model={tiny_model_dir}", "rollout.prompts_per_iter=2", "rollout.num_steps=4", "algorithm.branch_sample=1",
            "algorithm.branch_select=variance", "eval.every=0", "lora.rank=4", "lora.enabled=true"]
    cfg = load_config(TrainConfig, "configs/shapes/tempflow.yaml", over)
    tr = Trainer(cfg, tmp_path / "a")
    tr.iteration()
    tr.iteration()
    assert not torch.equal(tr.algorithm.spread, torch.ones(4))
    tensors, meta = tr.state()
    meta["step"] = tr.step
    other = Trainer(cfg, tmp_path / "b")
    other.load_state(tensors, meta)
    assert torch.equal(other.algorithm.spread, tr.algorithm.spread)
