"""Rectified-flow pretraining of the built-in shapes model on procedurally generated scenes, and its
typed configuration (`tempflow pretrain --config configs/shapes/pretrain.yaml`)."""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from tempflow.config import require, to_yaml
from tempflow.evaluate import evaluate, verifier_scoring
from tempflow.images import save_grid
from tempflow.math.flow import flow_matching_loss, interpolate, logit_normal_t
from tempflow.prompts import load_prompts
from tempflow.training.ema import ema_decay_at, ema_update
from tempflow.worlds.shapes.grammar import CATEGORIES
from tempflow.worlds.shapes.model import ShapesFlowModel, ShapesModelConfig
from tempflow.worlds.shapes.prompts import random_spec
from tempflow.worlds.shapes.scenes import render_batch, scene_for


@dataclass
class DataConfig:
    categories: list[str] = field(default_factory=lambda: list(CATEGORIES))  # drawn uniformly
    caption_dropout: float = 0.1  # probability of training on the empty prompt (for CFG)

    def __post_init__(self) -> None:
        bad = [c for c in self.categories if c not in CATEGORIES]
        require(not bad, f"data.categories: unknown {bad}; choose from {list(CATEGORIES)}")
        require(bool(self.categories), "data.categories must name at least one category")
        require(0.0 <= self.caption_dropout < 1.0, "data.caption_dropout must be in [0, 1)")


@dataclass
class PretrainOptimConfig:
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 200  # linear warm-up, then cosine decay to lr_min
    lr_min: float = 5e-5  # learning rate at the end of the cosine decay
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    batch_size: int = 64  # images per optimizer step

    def __post_init__(self) -> None:
        require(self.lr > 0, "optim.lr must be > 0, e.g. --set optim.lr=1e-3")
        require(self.batch_size >= 1, "optim.batch_size must be >= 1")
        require(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        require(self.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)")
        require(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        require(0 <= self.lr_min <= self.lr, "optim.lr_min must be in [0, optim.lr]")


@dataclass
class PreviewConfig:
    every: int = 1000  # optimizer steps between sample grids and quick evaluations; 0: only at the end
    eval_prompts: int = 108  # evaluation-set lines scored at each preview (spread over categories)
    steps: int = 20  # ODE steps of preview sampling
    guidance: float = 4.5  # classifier-free guidance of preview sampling

    def __post_init__(self) -> None:
        require(self.every >= 0, "preview.every must be >= 0")
        require(self.eval_prompts >= 1, "preview.eval_prompts must be >= 1")
        require(self.steps >= 1, "preview.steps must be >= 1")


@dataclass
class PretrainConfig:
    model: ShapesModelConfig = field(default_factory=ShapesModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: PretrainOptimConfig = field(default_factory=PretrainOptimConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    steps: int = 10_000  # optimizer steps of the flow model
    vae_steps: int = 3000  # optimizer steps of the VAE, trained first (latent models only)
    vae_lr: float = 1e-3  # VAE AdamW learning rate
    vae_batch_size: int = 32  # images per VAE step
    vae_kl: float = 1e-6  # weight of the VAE's KL term
    max_minutes: float = 0.0  # stop early after this wall-clock time; 0: no limit
    ema_decay: float = 0.999  # EMA of all weights; the saved model is the EMA
    t_mean: float = 0.0  # logit-normal timestep sampling: t = sigmoid(N(t_mean, t_std))
    t_std: float = 1.0
    seed: int = 0  # seeds data, initialisation and noise
    threads: int = 0  # torch CPU threads; 0: torch's default

    def __post_init__(self) -> None:
        m = self.model
        require(self.steps >= 1, "steps must be >= 1")
        require(self.threads >= 0, "threads must be >= 0 (0: torch's default)")
        require(self.vae_steps >= 0 and self.vae_batch_size >= 1, "vae_steps must be >= 0, vae_batch_size >= 1")
        require(m.latent_channels >= 0, "model.latent_channels must be >= 0 (0: pixel space)")
        require(not m.latent_channels or m.latent_size % m.patch_size == 0,
                 "model.image_size / 2**(len(model.vae_channels) - 1) must be a multiple of model.patch_size")
        require(0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)")
        require(self.t_std > 0, "t_std must be > 0")
        require(m.image_size % m.patch_size == 0, "model.image_size must be a multiple of model.patch_size")
        require(m.width % m.heads == 0, "model.width must be a multiple of model.heads")
        require(m.image_size >= 16, "model.image_size must be >= 16")
        require(m.shift > 0, "model.shift must be > 0")


PREVIEW_PROMPTS = [
    "a red circle", "a blue square", "a green triangle", "a yellow circle and a purple square",
    "three cyan circles", "two red triangles", "a blue circle to the left of a red square",
    "a green square above a yellow triangle",
]


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up to 1, then cosine decay to `floor` (a fraction of the peak)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_batch(rng: random.Random, cfg: PretrainConfig, n: int) -> tuple[torch.Tensor, list[str]]:
    """n rendered scenes (B, 3, H, W) in [0, 1] and their captions ("" with caption dropout)."""
    specs = [random_spec(rng, tuple(cfg.data.categories)) for _ in range(n)]
    images = render_batch([scene_for(s, rng) for s in specs], cfg.model.image_size)
    captions = ["" if rng.random() < cfg.data.caption_dropout else s.text() for s in specs]
    return torch.from_numpy(images), captions


def train_vae(model: ShapesFlowModel, cfg: PretrainConfig, rng: random.Random, log) -> None:
    """Phase 1 (latent models): fit the VAE to rendered scenes, then set its latent shift and scale so
    that the flow sees latents with zero mean and unit variance (as SD3's VAE config does)."""
    vae = model.vae
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    bar = tqdm(range(1, cfg.vae_steps + 1), desc="pretrain vae", dynamic_ncols=True)
    for step in bar:
        x = make_batch(rng, cfg, cfg.vae_batch_size)[0] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = (rec - x).pow(2).mean() + cfg.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 100 == 0 or step == cfg.vae_steps:
            log({"phase": "vae", "step": step, "vae_loss": loss.item()})
    with torch.no_grad():
        x = make_batch(rng, cfg, 512)[0] * 2 - 1
        z = vae.encode(x).latent_dist.mode()
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    vae.requires_grad_(False).eval()


def train_step(model: ShapesFlowModel, x0: torch.Tensor, captions: list[str], cfg: PretrainConfig,
               gen: torch.Generator) -> torch.Tensor:
    """Flow-matching loss of one batch (no optimizer work)."""
    eps = torch.randn(x0.shape, generator=gen)
    t = logit_normal_t(x0.shape[0], cfg.t_mean, cfg.t_std, gen)  # (B,)
    x_t = interpolate(x0, eps, t)
    v = model(x_t, t, model.encode_prompts(captions))
    return flow_matching_loss(v, x0, eps)


def preview(ema: ShapesFlowModel, model: ShapesFlowModel, cfg: PretrainConfig, out: Path, step: int) -> dict:
    """Sample grid and a quick evaluation on a spread of the evaluation set, with the EMA weights
    (and, for comparison, the raw weights)."""
    ema.eval()
    model.eval()
    from tempflow.worlds.shapes import WORLD

    lines = load_prompts("shapes-eval", cfg.preview.eval_prompts)
    scoring = verifier_scoring(WORLD, lines)
    summary, _ = evaluate(ema, lines, scoring, cfg.preview.steps, cfg.preview.guidance, seed=10_000)
    raw, _ = evaluate(model, lines, scoring, cfg.preview.steps, cfg.preview.guidance, seed=10_000)
    model.train()
    from tempflow.sampling import generate

    imgs = generate(ema, PREVIEW_PROMPTS * 2, list(range(16)), cfg.preview.steps, cfg.preview.guidance)
    save_grid(imgs, out / "samples" / f"step_{step:06d}.png", PREVIEW_PROMPTS * 2, cols=8)
    return {"step": step, "eval_overall": summary["overall"], "eval_raw_overall": raw["overall"],
            **{f"eval_{k}": v for k, v in summary["per_category"].items()}}


def pretrain(cfg: PretrainConfig, out: str | Path) -> Path:
    """Train from scratch; writes metrics.jsonl, samples/, tensorboard/ and model/ (the EMA)."""
    from torch.utils.tensorboard import SummaryWriter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    model = ShapesFlowModel(cfg.model)
    log_file = open(out / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed below)

    def log(row: dict) -> None:
        log_file.write(json.dumps(row) + "\n")
        log_file.flush()

    start = time.time()
    if model.vae is not None:
        train_vae(model, cfg, rng, log)
    params = [p for p in model.parameters() if p.requires_grad]
    ema = copy.deepcopy(model).requires_grad_(False)
    ema_params = [e for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, o.warmup_steps, cfg.steps, o.lr_min / o.lr))
    writer = SummaryWriter(str(out / "tensorboard"))
    bar = tqdm(range(1, cfg.steps + 1), desc="pretrain flow", dynamic_ncols=True)
    with log_file:
        for step in bar:
            images, captions = make_batch(rng, cfg, o.batch_size)
            loss = train_step(model, model.encode_images(images), captions, cfg, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            opt.step()
            sched.step()
            ema_update(ema_params, params, ema_decay_at(step, cfg.ema_decay))
            elapsed = time.time() - start
            timed_out = cfg.max_minutes and elapsed > cfg.max_minutes * 60
            last = step == cfg.steps or timed_out
            row: dict = {"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0], "time_s": elapsed}
            if (cfg.preview.every and step % cfg.preview.every == 0) or last:
                row.update(preview(ema, model, cfg, out, step))
                ema.save(out / "model")
                bar.write(f"step {step}: eval overall {row['eval_overall']:.3f} "
                          f"(raw weights {row['eval_raw_overall']:.3f})")
            for k, v in row.items():
                if k != "step":
                    writer.add_scalar(k, v, step)
            log(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if last:
                break
    writer.close()
    return out / "model"
