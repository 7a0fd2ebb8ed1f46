"""Typed configuration of `tempflow train`.

Every size here is configuration: prompts and seeds per iteration here, children, branch points and
windows in the algorithm's own section (`algorithm:`, whose options depend on `algorithm.name`);
nothing in the trainer assumes a group size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tempflow.algorithms import algorithm_class, options_of
from tempflow.algorithms.base import GROUPINGS
from tempflow.algorithms.tempflow_grpo import TempFlowConfig
from tempflow.config import require
from tempflow.math.advantages import STDS
from tempflow.math.schedule import SCHEDULES
from tempflow.models.base import ModelOptions
from tempflow.models.lora import LORA_INITS

PRECISIONS = ("no", "bf16", "fp16", "auto")
# keys of older configs and where they live now
MOVED = {"rollout.algorithm": "algorithm.name", "rollout.noise_level": "algorithm.noise_level",
         "rollout.children": "algorithm.children", "rollout.branch_points": "algorithm.branch_points",
         "rollout.branch_sample": "algorithm.branch_sample", "rollout.branch_select": "algorithm.branch_select",
         "rollout.branch_floor": "algorithm.branch_floor", "rollout.branch_decay": "algorithm.branch_decay",
         "rollout.completion_steps": "algorithm.completion_steps", "rollout.window": "algorithm.window",
         "rollout.window_size": "algorithm.window_size", "rollout.window_start": "algorithm.window_start",
         "rollout.window_shift_every": "algorithm.window_shift_every", "loss": "algorithm",
         "loss.clip_range": "algorithm.clip_range", "loss.kl_beta": "algorithm.kl_beta",
         "loss.noise_weighting": "algorithm.noise_weighting", "advantage.global_std": "advantage.std (pooled)"}


@dataclass
class RolloutConfig:
    """What every algorithm samples per iteration; how it samples is the algorithm's own section."""

    num_steps: int = 10  # T, steps of the sampling grid during training
    guidance: float = 4.5  # classifier-free guidance of the rollouts (and of the trained velocity)
    prompts_per_iter: int = 8  # prompts drawn per iteration
    seeds_per_prompt: int = 2  # initial noises per prompt: the group (flow_grpo, nft, awm) or TempFlow's seeds
    max_batch: int = 256  # largest model batch in rollouts (before CFG doubling)

    def __post_init__(self) -> None:
        require(self.num_steps >= 2, "rollout.num_steps must be >= 2")
        require(self.guidance >= 1.0, "rollout.guidance must be >= 1 (1 disables guidance)")
        require(self.prompts_per_iter >= 1, "rollout.prompts_per_iter must be >= 1")
        require(self.seeds_per_prompt >= 1, "rollout.seeds_per_prompt must be >= 1")
        require(self.max_batch >= 1, "rollout.max_batch must be >= 1")


@dataclass
class AdvantageConfig:
    group_by: str = "seed_step"  # prompt | prompt_step | seed_step (prompt + initial noise + branch point)
    # the divisor: group (each group's std) | pooled (the root mean square of every reward's deviation
    # from its group mean) | batch (the std of all rewards of the iteration, as Flow-GRPO's global std)
    std: str = "group"
    clip: float = 5.0  # advantages are clipped to [-clip, clip]

    def __post_init__(self) -> None:
        require(self.group_by in GROUPINGS, f"advantage.group_by must be one of {GROUPINGS}")
        require(self.std in STDS, f"advantage.std must be one of {', '.join(STDS)}")
        require(self.clip > 0, "advantage.clip must be > 0")


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
        require(self.lr > 0, "optim.lr must be > 0")
        require(0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0, "optim.beta1 and optim.beta2 must be in [0, 1)")
        require(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        require(self.lr_schedule in SCHEDULES, f"optim.lr_schedule must be one of {', '.join(SCHEDULES)}")
        require(0.0 <= self.warmup < 1.0, "optim.warmup is a fraction of the budget: >= 0 and < 1")
        require(0.0 <= self.lr_final <= 1.0, "optim.lr_final is a fraction of optim.lr: between 0 and 1")
        require(self.minibatch >= 1 and self.grad_accum >= 1 and self.inner_epochs >= 1,
                 "optim.minibatch, optim.grad_accum and optim.inner_epochs must be >= 1")
        require(self.steps_per_rollout >= 0, "optim.steps_per_rollout must be >= 0 (0: use optim.grad_accum)")
        require(self.grad_clip >= 0, "optim.grad_clip must be >= 0")
        if str(self.mixed_precision).lower() in ("false", "off"):  # YAML reads an unquoted no / off as false
            self.mixed_precision = "no"
        require(self.mixed_precision in PRECISIONS, f"optim.mixed_precision must be one of {PRECISIONS}")


@dataclass
class LoraConfig:
    enabled: bool = True  # false: full fine-tuning of the flow transformer
    rank: int = 32
    alpha: float = 64.0
    # suffixes of the module names to adapt; []: the model's own list (attention projections for the shapes
    # model and SD3, plus the feed-forward layers for FLUX)
    targets: list[str] = field(default_factory=list)
    # the adapters' A matrices at the start (B starts at zero either way): default (peft's Kaiming-uniform)
    # | gaussian (N(0, 1/rank^2), as Flow-GRPO's and TempFlow-GRPO's scripts)
    init: str = "default"

    def __post_init__(self) -> None:
        require(self.rank >= 1, "lora.rank must be >= 1")
        require(all(isinstance(t, str) and t for t in self.targets), "lora.targets must be module-name suffixes")
        require(self.init in LORA_INITS, f"lora.init must be one of {', '.join(LORA_INITS)}, got {self.init!r}")


@dataclass
class EmaConfig:
    decay: float = 0.9  # EMA of the trained weights, used for evaluation and the final model
    every: int = 8  # optimizer steps between EMA updates

    def __post_init__(self) -> None:
        require(0 <= self.decay < 1, "ema.decay must be in [0, 1)")
        require(self.every >= 1, "ema.every must be >= 1")


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
        require(self.every >= 0 and self.limit >= 0, "eval.every and eval.limit must be >= 0")
        require(self.num_steps >= 1, "eval.num_steps must be >= 1")
        require(self.samples >= 1, "eval.samples must be >= 1")


@dataclass
class GuardConfig:
    """What stops a diverging run, and what warns of one."""

    # optimizer steps in a row whose weights came out non-finite (each one undone) before the run stops
    max_bad_steps: int = 3
    # keep a copy of the trained weights and optimizer state to undo a non-finite step (false: the first
    # non-finite step stops the run; saves 3x the trained weights' memory in full fine-tuning)
    rollback: bool = True
    # iterations in a row with half or more of the rewards NaN or infinite before the run stops
    nonfinite_iterations: int = 3
    window: int = 10  # iterations the divergence warnings average over
    reward_drop: float = 1.0  # warn when the windowed reward mean falls this many reward stds below its best; 0: off
    spike: float = 10.0  # warn when kl or grad_norm jump over this many times their windowed median; 0: off

    def __post_init__(self) -> None:
        require(self.max_bad_steps >= 1, "guard.max_bad_steps must be >= 1")
        require(self.nonfinite_iterations >= 1, "guard.nonfinite_iterations must be >= 1")
        require(self.window >= 2, "guard.window must be >= 2")
        require(self.reward_drop >= 0, "guard.reward_drop must be >= 0 (0: off)")
        require(self.spike == 0 or self.spike > 1, "guard.spike must be > 1 (0: off)")


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
    # the algorithm and its options: name (tempflow_grpo, flow_grpo, nft, awm, tempflow_nft, or a dotted
    # path package.module:Class) and the fields of that algorithm's Config
    algorithm: Any = field(default_factory=TempFlowConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self) -> None:
        require(self.iterations >= 1, "iterations must be >= 1")
        require(self.checkpoint_every >= 1, "checkpoint_every must be >= 1")
        require(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        require(self.max_minutes >= 0, "max_minutes must be >= 0")
        require(self.max_nfe >= 0, "max_nfe must be >= 0")
        require(self.threads >= 0, "threads must be >= 0 (0: torch's default)")
        require(self.prompt_balance in ("none", "category"), "prompt_balance must be none or category")
        algo = algorithm_class(self.algorithm.name)
        require(isinstance(self.algorithm, algo.Config), f"algorithm {self.algorithm.name!r} takes a "
                f"{algo.Config.__name__} section, not a {type(self.algorithm).__name__}")
        require(self.advantage.group_by in algo.groupings, f"{self.algorithm.name} groups by "
                f"{' or '.join(algo.groupings)}: set advantage.group_by={algo.groupings[0]}")
        self.algorithm.check(self)

    @staticmethod
    def select_sections(cfg: DictConfig, layers: list[DictConfig]) -> None:
        """Give cfg's `algorithm` section the schema of the algorithm the layers (presets, then
        overrides) name last, before they are merged: its options are checked as any others."""
        name = cfg.algorithm.name
        for layer in layers:
            value = OmegaConf.select(layer, "algorithm.name", default=None)
            if value is not None:
                name = str(value)
        cfg.algorithm = OmegaConf.structured(algorithm_class(name).Config)
        cfg.algorithm.name = name

    @staticmethod
    def key_hint(key: str) -> str:
        """What to write instead of an unknown key: where an older key moved, or which algorithms
        have an option of that name."""
        if key in MOVED:
            return f"it is now {MOVED[key]}"
        section, _, option = key.partition(".")
        owners = options_of(option) if section == "algorithm" else []
        return f"it is an option of {', '.join(owners)} (set algorithm.name)" if owners else ""
