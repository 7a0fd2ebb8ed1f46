"""Test helper: one training iteration, phase by phase, dumping what each process computed.

    python tests/dist_dump.py OUT MODEL_DIR                                 one process
    torchrun --standalone --nproc_per_node 2 tests/dist_dump.py OUT MODEL_DIR   two processes

For each case of CASES, writes OUT/CASE/rank_R.safetensors: the rewards and group keys of all images
(gathered), this process's children (rows), their advantages and global row numbers, the gradients
of the first optimizer step (after the all-reduce) and the weights after the update. The reward is
the mean pixel value: it moves with any change of an image.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tempflow import rewards
from tempflow.config import load_config
from tempflow.training.config import TrainConfig
from tempflow.training.loop import Trainer


def _mean_pixel(**_: object):
    return lambda images, prompts, meta: images.float().mean(dim=(1, 2, 3))


BASE = ["rollout.num_steps=4", "eval.every=0", "lora.enabled=true", "lora.rank=4", "threads=1", "algorithm.kl_beta=0.1",
        "optim.mixed_precision=no"]
CASES = {
    # 4 (prompt, seed) units, 2 branch points x 3 children: minibatches of 7 rows mix the two processes
    "tempflow": [*BASE, "rollout.prompts_per_iter=2", "rollout.seeds_per_prompt=2", "algorithm.children=3",
                 "algorithm.branch_sample=2", "optim.minibatch=7"],
    # 3 prompts x 2 trajectories: prompt 1's group is split between the processes; minibatches of one
    # row leave one process without rows each time, accumulated over 3 of them
    "flow_grpo": [*BASE, "rollout.prompts_per_iter=3",
                  "rollout.seeds_per_prompt=2", "optim.minibatch=1", "optim.grad_accum=3"],
    # the likelihood-free algorithms: 3 prompts x 2 samples (a group split between the processes), rows
    # of several times per sample; the old policy / anchor after the update is compared too
    "nft": [*BASE, "rollout.prompts_per_iter=3", "rollout.seeds_per_prompt=2", "algorithm.timesteps=2",
            "optim.minibatch=5", "optim.steps_per_rollout=2"],
    "awm": [*BASE, "rollout.prompts_per_iter=3", "rollout.seeds_per_prompt=2", "rollout.num_steps=6",
            "algorithm.timesteps=2", "optim.minibatch=5"],
    "tempflow_nft": [*BASE, "rollout.prompts_per_iter=2", "rollout.seeds_per_prompt=2", "algorithm.children=3",
                     "algorithm.branch_sample=2", "algorithm.objective=both", "optim.minibatch=7"],
}


def run_case(out: str, case: str, model: str) -> Trainer:
    """One iteration of CASES[case], phase by phase; writes OUT/CASE/rank_R.safetensors."""
    rewards.REWARDS["mean_pixel"] = _mean_pixel
    cfg = load_config(TrainConfig, f"configs/shapes/{case}.yaml", [f"model={model}", "reward=mean_pixel", *CASES[case]])
    folder = Path(out) / case
    tr = Trainer(cfg, folder / "run")
    grads: list[torch.Tensor] = []  # the gradient the first optimizer step sees, all-reduced
    tr.gradient_observer = lambda g: grads.append(g) if not grads else None
    prompts = tr.sampler.next(cfg.rollout.prompts_per_iter)
    ro = tr.rollout(prompts)
    reward, _ = tr.score(ro, prompts)
    adv = tr.advantages(ro, reward)
    img_off, row_off, _ = tr._layout(ro)
    stats = tr.update(ro, adv, tr.encode(prompts))
    tr.algorithm.after_update(tr.optimizer_steps)
    own = {"x_next": ro.x_next, "log_prob_old": ro.log_prob_old} if hasattr(ro, "x_next") else {
        "x0": ro.x0[ro.row_image], "row_t": ro.row_t, "row_noise": ro.row_noise}
    out_t = {
        "rewards": reward, "keys": tr.image_keys(ro), **own,
        **{f"algorithm.{k}": v for k, v in tr.algorithm.state()[0].items()},
        "row_adv": adv.values[ro.row_image + img_off], "row_id": torch.arange(len(ro)) + row_off,
        "loss": torch.tensor(stats.summary()["loss"]), "image_prompt": ro.image_prompt,
        **{f"grad.{i}": g for i, g in enumerate(grads)},
        **{f"weight.{i}": p.detach() for i, p in enumerate(tr.params)},
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in out_t.items()}, str(folder / f"rank_{tr.dist.rank}.safetensors"))
    return tr


if __name__ == "__main__":
    for name in CASES:
        trainer = run_case(sys.argv[1], name, sys.argv[2])
    trainer.dist.close()
