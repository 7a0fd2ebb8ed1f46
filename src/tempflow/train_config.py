"""Typed configuration of `tempflow train` (TempFlow-GRPO, Flow-GRPO and their variants).

Every size here is configuration: seeds per prompt, children per branch point, branch points, the
SDE window; nothing in the trainer assumes a group size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tempflow.config import ConfigError, _require
from tempflow.models.base import ModelOptions
from tempflow.schedule import SCHEDULES

ALGORITHMS = ("tempflow", "flow_grpo")
WINDOWS = ("all", "fixed", "random", "sliding")
GROUPINGS = ("prompt", "prompt_step", "seed_step")
PRECISIONS = ("no", "bf16", "fp16", "auto")


@dataclass
class RolloutConfig:
    algorithm: str = "tempflow"  # tempflow: ODE path + SDE branches; flow_grpo: SDE trajectories
    num_steps: int = 10  # T, steps of the sampling grid during training
    guidance: float = 4.5  # classifier-free guidance, in sampling and in training alike
    noise_level: float = 0.7  # a, the SDE noise level
    prompts_per_iter: int = 8  # prompts drawn per iteration
    seeds_per_prompt: int = 2  # tempflow: initial noises per prompt; flow_grpo: trajectories per prompt
    children: int = 4  # tempflow: SDE children per (seed, branch point)
    branch_points: list[int] = field(default_factory=list)  # tempflow: steps to branch at; [] = 0..T-2
    branch_sample: int = 0  # tempflow: if > 0, draw this many of the branch points each iteration
    branch_select: str = "uniform"  # tempflow, with branch_sample: uniform | variance (where rewards spread)
    branch_floor: float = 0.25  # branch_select=variance: weight floor, as a fraction of the mean estimate
    branch_decay: float = 0.9  # branch_select=variance: EMA decay of the per-step reward-spread estimate
    completion_steps: int = 0  # tempflow: children reach t = 0 in at most this many ODE steps; 0: the grid's
    window: str = "all"  # flow_grpo: SDE steps: all (0..T-2) | fixed | random | sliding
    window_size: int = 0  # flow_grpo: steps in the window (fixed, random, sliding)
    window_start: int = 0  # flow_grpo: first SDE step of a fixed window
    window_shift_every: int = 10  # flow_grpo sliding: iterations before the window moves one step later
    max_batch: int = 256  # largest model batch in rollouts (before CFG doubling)

    def candidate_steps(self) -> list[int]:
        """The steps that can be trained: branch points (tempflow) or the SDE window's range."""
        if self.algorithm == "tempflow":
            return sorted(self.branch_points) if self.branch_points else list(range(self.num_steps - 1))
        if self.window == "fixed":
            return list(range(self.window_start, self.window_start + self.window_size))
        return list(range(self.num_steps - 1))

    def __post_init__(self) -> None:
        _require(self.algorithm in ALGORITHMS, f"rollout.algorithm must be one of {ALGORITHMS}")
        _require(self.num_steps >= 2, "rollout.num_steps must be >= 2")
        _require(self.noise_level > 0, "rollout.noise_level must be > 0 (0 makes every step deterministic)")
        _require(self.guidance >= 1.0, "rollout.guidance must be >= 1 (1 disables guidance)")
        _require(self.prompts_per_iter >= 1, "rollout.prompts_per_iter must be >= 1")
        _require(self.seeds_per_prompt >= 1, "rollout.seeds_per_prompt must be >= 1")
        _require(self.children >= 2, "rollout.children must be >= 2: a group of one child has no spread")
        last = self.num_steps - 2
        bad = [j for j in self.branch_points if not 0 <= j <= last]
        _require(not bad, f"rollout.branch_points {bad} lie outside the grid; allowed 0..{last} for num_steps "
                          f"{self.num_steps}")
        _require(len(set(self.branch_points)) == len(self.branch_points), "rollout.branch_points repeat a step")
        _require(0 <= self.branch_sample <= len(self.candidate_steps()) or self.algorithm != "tempflow",
                 f"rollout.branch_sample must be in 0..{len(self.candidate_steps())}")
        _require(self.window in WINDOWS, f"rollout.window must be one of {WINDOWS}")
        if self.algorithm == "flow_grpo":
            _require(self.seeds_per_prompt >= 2, "rollout.seeds_per_prompt must be >= 2 for flow_grpo groups")
            if self.window != "all":
                _require(1 <= self.window_size <= last + 1, f"rollout.window_size must be in 1..{last + 1}")
            if self.window == "fixed":
                _require(0 <= self.window_start and self.window_start + self.window_size <= last + 1,
                         f"rollout.window_start + window_size must be <= {last + 1}")
        _require(self.window_shift_every >= 1, "rollout.window_shift_every must be >= 1")
        _require(self.max_batch >= 1, "rollout.max_batch must be >= 1")
        _require(self.branch_select in ("uniform", "variance"), "rollout.branch_select must be uniform or variance")
        _require(self.branch_floor > 0, "rollout.branch_floor must be > 0 (every step keeps a chance)")
        _require(0 <= self.branch_decay < 1, "rollout.branch_decay must be in [0, 1)")
        _require(self.completion_steps >= 0, "rollout.completion_steps must be >= 0 (0: every grid step)")


@dataclass
class AdvantageConfig:
    group_by: str = "seed_step"  # prompt | prompt_step | seed_step (prompt + initial noise + branch point)
    global_std: bool = False  # divide by the std over the whole batch instead of the group's
    clip: float = 5.0  # advantages are clipped to [-clip, clip]

    def __post_init__(self) -> None:
        _require(self.group_by in GROUPINGS, f"advantage.group_by must be one of {GROUPINGS}")
        _require(self.clip > 0, "advantage.clip must be > 0")


@dataclass
class LossConfig:
    clip_range: float = 1e-4  # eps of the clipped surrogate (log-probs are averaged over dims)
    kl_beta: float = 0.004  # weight of the KL term to the frozen base
    noise_weighting: bool = True  # multiply each step's surrogate by std_j / mean std (method 4.2)

    def __post_init__(self) -> None:
        _require(self.clip_range > 0, "loss.clip_range must be > 0, e.g. 1e-4")
        _require(self.kl_beta >= 0, "loss.kl_beta must be >= 0")


@dataclass
class OptimConfig:
    lr: float = 3e-4  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    minibatch: int = 64  # transitions per backward pass
    grad_accum: int = 1  # backward passes per optimizer step
    steps_per_rollout: int = 0  # if > 0: optimizer steps per pass over a rollout (its minibatches split evenly)
    inner_epochs: int = 1  # passes over one rollout's transitions
    # no | bf16 | fp16 | auto (bf16 where the device has bf16 arithmetic, else no); the step math stays float32
    mixed_precision: str = "no"
    # learning rate over the run's budget (iterations, max_minutes or max_nfe, whichever binds first):
    # constant | linear | cosine decay to lr_final x lr, after a linear warm-up over the first `warmup`
    # fraction of the budget
    lr_schedule: str = "constant"
    warmup: float = 0.0
    lr_final: float = 0.0

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr must be > 0")
        _require(self.lr_schedule in SCHEDULES, f"optim.lr_schedule must be one of {', '.join(SCHEDULES)}")
        _require(0.0 <= self.warmup < 1.0, "optim.warmup is a fraction of the budget: >= 0 and < 1")
        _require(0.0 <= self.lr_final <= 1.0, "optim.lr_final is a fraction of optim.lr: between 0 and 1")
        _require(self.minibatch >= 1 and self.grad_accum >= 1 and self.inner_epochs >= 1,
                 "optim.minibatch, optim.grad_accum and optim.inner_epochs must be >= 1")
        _require(self.steps_per_rollout >= 0, "optim.steps_per_rollout must be >= 0 (0: use optim.grad_accum)")
        _require(self.grad_clip >= 0, "optim.grad_clip must be >= 0")
        if str(self.mixed_precision).lower() in ("false", "off"):  # YAML reads an unquoted no / off as false
            self.mixed_precision = "no"
        _require(self.mixed_precision in PRECISIONS, f"optim.mixed_precision must be one of {PRECISIONS}")


@dataclass
class LoraConfig:
    enabled: bool = True  # false: full fine-tuning of the flow transformer
    rank: int = 32
    alpha: float = 64.0
    # suffixes of the module names to adapt; []: the model's own list (attention projections for the shapes
    # model and SD3, plus the feed-forward layers for FLUX)
    targets: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(self.rank >= 1, "lora.rank must be >= 1")
        _require(all(isinstance(t, str) and t for t in self.targets), "lora.targets must be module-name suffixes")


@dataclass
class EmaConfig:
    decay: float = 0.9  # EMA of the trained weights, used for evaluation and the final model
    every: int = 8  # optimizer steps between EMA updates

    def __post_init__(self) -> None:
        _require(0 <= self.decay < 1, "ema.decay must be in [0, 1)")
        _require(self.every >= 1, "ema.every must be >= 1")


@dataclass
class EvalConfig:
    every: int = 10  # iterations between evaluations (also after the first and the last); 0: never
    prompts: str = "shapes-eval"  # prompt set or file
    limit: int = 0  # evaluate an even spread of this many lines; 0: all
    num_steps: int = 20  # ODE steps for evaluation
    guidance: float = 3.0
    seed: int = 0
    # samples per line: the accuracy is their mean (less noise), and eval_pass_at_k is logged beside it;
    # sample k of line i is drawn with seed + k * lines + i, as `tempflow eval --samples` draws it
    samples: int = 1

    def __post_init__(self) -> None:
        _require(self.every >= 0 and self.limit >= 0, "eval.every and eval.limit must be >= 0")
        _require(self.num_steps >= 1, "eval.num_steps must be >= 1")
        _require(self.samples >= 1, "eval.samples must be >= 1")


@dataclass
class TrainConfig:
    model: str = "shapes-base"  # shipped model name, model folder or hub id (stabilityai/stable-diffusion-3.5-medium)
    model_options: ModelOptions = field(default_factory=ModelOptions)  # device, dtype, resolution, memory savers
    reward: str = "shapes"  # registered reward
    prompts: str = "shapes-train"  # prompt set or file, one prompt per line
    prompt_balance: str = "none"  # none: shuffled passes over the prompts | category: each category equally often
    iterations: int = 100  # rollout + update iterations
    max_minutes: float = 0.0  # stop (with a checkpoint) after this much wall-clock; 0: no limit
    max_nfe: int = 0  # stop (with a checkpoint) once rollouts used this many model calls; 0: no limit
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0: torch's default
    checkpoint_every: int = 5  # iterations between checkpoints (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _require(self.iterations >= 1, "iterations must be >= 1")
        _require(self.checkpoint_every >= 1, "checkpoint_every must be >= 1")
        _require(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        _require(self.max_minutes >= 0, "max_minutes must be >= 0")
        _require(self.max_nfe >= 0, "max_nfe must be >= 0")
        _require(self.prompt_balance in ("none", "category"), "prompt_balance must be none or category")
        if self.rollout.algorithm == "flow_grpo" and self.advantage.group_by != "prompt":
            raise ConfigError("flow_grpo trains on terminal rewards: set advantage.group_by=prompt")
