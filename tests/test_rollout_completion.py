"""Child completion: every grid step (the paper) or fewer, larger ODE steps; per-row times batched."""

import torch

from tempflow.algorithms.tempflow_grpo import completion_path, expected_branching_nfe
from tempflow.config import load_config
from tempflow.math.flow import ode_step
from tempflow.training.config import TrainConfig
from tempflow.training.loop import Trainer

TINY = ["rollout.prompts_per_iter=2", "rollout.seeds_per_prompt=2", "algorithm.children=3", "rollout.num_steps=4",
        "algorithm.branch_sample=0", "eval.every=0", "lora.rank=4", "lora.enabled=true", "optim.mixed_precision=no"]


def test_completion_path():
    assert completion_path(1, 10) == list(range(1, 11))
    assert completion_path(1, 10, 3) == [1, 4, 7, 10]
    assert completion_path(8, 10, 3) == [8, 9, 10]  # fewer steps left than asked: the grid's
    assert completion_path(0, 10, 1) == [0, 10]
    for s in range(10):
        for n in range(1, 12):
            p = completion_path(s, 10, n)
            assert p[0] == s and p[-1] == 10 and len(p) - 1 == min(n, 10 - s)
            assert all(a < b for a, b in zip(p, p[1:]))


def _trainer(tiny_model_dir, tmp_path, *extra) -> Trainer:
    cfg = load_config(TrainConfig, "configs/shapes/tempflow.yaml", [f"model={tiny_model_dir}", *TINY, *extra])
    return Trainer(cfg, tmp_path / "run")


def _complete(model, x, prompt_cond, sig, path, guidance):
    for a, b in zip(path, path[1:]):
        v = model.velocity(x, sig[a].expand(1), prompt_cond, guidance)
        x = ode_step(x, v, sig[a], sig[b])
    return model.decode(x)


def test_children_images_equal_a_direct_ode_completion(tiny_model_dir, tmp_path):
    for steps in (0, 1):
        tr = _trainer(tiny_model_dir, tmp_path / str(steps), f"algorithm.completion_steps={steps}")
        prompts = ["a red circle", "two squares"]
        ro = tr.rollout(prompts)
        r, sig = tr.cfg.rollout, tr.policy.sigmas(tr.cfg.rollout.num_steps)
        assert ro.nfe == expected_branching_nfe(4, r.num_steps, tr.cfg.algorithm.children, [0, 1, 2], r.guidance,
                                                steps)
        cond = tr.encode(prompts)
        with torch.no_grad():
            for row in (0, len(ro) // 2, len(ro) - 1):
                j = int(ro.step[row])
                path = completion_path(j + 1, r.num_steps, steps)
                img = _complete(tr.model, ro.x_next[row : row + 1], cond.index(ro.prompt_index[row : row + 1]),
                                sig, path, r.guidance)
                assert torch.allclose(img[0], ro.images[int(ro.row_image[row])], atol=1e-4)


def test_fewer_completion_steps_cost_fewer_calls(tiny_model_dir, tmp_path):
    full = _trainer(tiny_model_dir, tmp_path / "a").rollout(["a red circle", "two squares"])
    short = _trainer(tiny_model_dir, tmp_path / "b", "algorithm.completion_steps=1").rollout(
        ["a red circle", "two squares"])
    assert full.nfe == 4 * (3 + 3 * (3 + 2 + 1)) * 2
    assert short.nfe == 4 * (3 + 3 * (1 + 1 + 1)) * 2
    assert torch.equal(full.x, short.x) and torch.equal(full.x_next, short.x_next)  # same branches


def test_nfe_counts_guidance_forwards_per_model():
    from tempflow.algorithms import Policy
    from tempflow.models.flux import FluxFlowModel
    from tempflow.models.sd3 import SD3FlowModel

    def per_row(model_class, guidance):
        return Policy(model_class, None, [], "no", 1).forwards_per_row(guidance)

    assert FluxFlowModel.cfg_batch is False  # guidance embedding: one forward per row
    assert getattr(SD3FlowModel, "cfg_batch", True) is True
    assert per_row(SD3FlowModel, 4.5) == 2 and per_row(SD3FlowModel, 1.0) == 1
    assert per_row(FluxFlowModel, 3.5) == 1
