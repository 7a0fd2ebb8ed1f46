import json

import torch

from tempflow.config import load_config
from tempflow.models import load_model
from tempflow.worlds.shapes.pretrain import PretrainConfig, lr_factor
from tempflow.worlds.shapes.pretrain import pretrain as run_pretrain

TINY = ["model.latent_channels=0", "model.patch_size=4", "model.image_size=16", "model.width=32", "model.depth=1",
        "model.heads=2", "model.text_width=16", "model.text_depth=1", "optim.batch_size=8", "optim.warmup_steps=2",
        "steps=6", "preview.every=3", "preview.eval_prompts=6", "preview.steps=2"]


def test_pretraining_smoke_run(tmp_path):
    cfg = load_config(PretrainConfig, "configs/shapes/pretrain.yaml", TINY)
    model_dir = run_pretrain(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))  # pixel model: no VAE phase
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    evals = [r for r in rows if "eval_overall" in r]
    assert [r["step"] for r in evals] == [3, 6] and 0 <= evals[-1]["eval_overall"] <= 1
    assert (tmp_path / "run" / "samples" / "step_000006.png").is_file()
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    model = load_model(str(model_dir))
    assert model.cfg.image_size == 16


def test_pretraining_lowers_the_loss(tmp_path):
    over = [o for o in TINY if not o.startswith(("steps", "preview.every"))]
    cfg = load_config(PretrainConfig, "configs/shapes/pretrain.yaml",
                      over + ["steps=40", "preview.every=0", "optim.lr=3e-3"])
    run_pretrain(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.7 * first


def test_lr_schedule():
    assert lr_factor(0, 10, 100, 0.1) == 0.1
    assert lr_factor(9, 10, 100, 0.1) == 1.0
    assert abs(lr_factor(100, 10, 100, 0.1) - 0.1) < 1e-9


def test_latent_pretraining_trains_the_vae_first(tmp_path):
    over = TINY + ["model.latent_channels=4", "model.vae_channels=[8,8]", "model.patch_size=1", "vae_steps=3",
                   "vae_batch_size=4"]
    cfg = load_config(PretrainConfig, "configs/shapes/pretrain.yaml", over)
    model_dir = run_pretrain(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("phase") == "vae"] == [3]
    model = load_model(str(model_dir))
    assert model.vae is not None and model.vae.config.scaling_factor != 1.0
