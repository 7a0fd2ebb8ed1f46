"""The SD3 and FLUX adapters on tiny random pipelines (built offline, see diffusers_tiny.py): loading,
the time / shift / guidance conventions against the pipelines' own sampling, two training iterations
of each algorithm through `tempflow.training.run`, and the export round trip into diffusers."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

import tempflow.training.run as train_mod
from diffusers_tiny import PROMPTS, RES, T5_TOKENS, build_flux, build_sd3
from tempflow.config import load_config
from tempflow.errors import ConfigError, ModelLoadError, TempflowError
from tempflow.models import ModelOptions, TrainableFlowModel, load_model
from tempflow.models.base import Conditioning
from tempflow.models.export import export_run
from tempflow.models.flux import pack, unpack
from tempflow.models.lora import LORA_FILE
from tempflow.sampling import initial_noise, ode_sample
from tempflow.training.config import TrainConfig

diffusers_logging.set_verbosity_error()
transformers_logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)

PIPES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
GUIDANCE = {"sd3": 4.5, "flux": 3.5}  # CFG scale / FLUX guidance embedding
OPTIONS = ModelOptions(resolution=RES, dtype="fp32", max_sequence_length=T5_TOKENS)
STEPS = 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipes")
    return {"sd3": build_sd3(root / "sd3"), "flux": build_flux(root / "flux")}


def pipeline(folders: dict[str, Path], name: str):
    pipe = PIPES[name].from_pretrained(folders[name])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_latents(name: str, noise: torch.Tensor) -> torch.Tensor:
    return pack(noise) if name == "flux" else noise


def pipe_sample(pipe, name: str, prompts: list[str], noise: torch.Tensor, output_type: str, **embeds) -> torch.Tensor:
    """The pipeline's own sampling loop from the given initial latents (tempflow's unpacked layout)."""
    text = {"prompt": prompts} if not embeds else embeds
    out = pipe(**text, latents=pipe_latents(name, noise), num_inference_steps=STEPS, guidance_scale=GUIDANCE[name],
               height=RES, width=RES, max_sequence_length=T5_TOKENS, output_type=output_type).images
    return unpack(out, *noise.shape[2:]) if name == "flux" and output_type == "latent" else out


def tempflow_sample(model, prompts: list[str], noise: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = ode_sample(model, noise, model.encode_prompts(prompts), STEPS, GUIDANCE[name])
    return x, model.decode(x)


# ---- loading and the conventions ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_load_model_shapes_and_grid(folders, name):
    model = load_model(str(folders[name]), OPTIONS)
    assert isinstance(model, TrainableFlowModel)
    assert model.latent_shape() == (4, RES // 2, RES // 2)
    pipe = pipeline(folders, name)
    pipe_sample(pipe, name, PROMPTS[:1], initial_noise(model.latent_shape(), [0]), "latent")
    assert torch.equal(model.sigmas(STEPS), pipe.scheduler.sigmas)  # the grid the pipeline just used
    x = torch.randn(3, *model.latent_shape())
    cond = model.encode_prompts(PROMPTS[:3])
    v = model.velocity(x, torch.tensor([0.9, 0.5, 0.1]), cond, GUIDANCE[name])
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    with pytest.raises(ModelLoadError, match="multiple of 4"):
        load_model(str(folders[name]), ModelOptions(resolution=30))
    offloaded = load_model(str(folders[name]), ModelOptions(**{**vars(OPTIONS), "offload": True}))
    assert torch.equal(offloaded.encode_prompts(PROMPTS[:3]).tokens, cond.tokens)
    assert torch.equal(offloaded.decode(x), model.decode(x))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_ode_sampling_matches_the_pipeline(folders, name):
    """Same initial latents, steps and guidance: tempflow's Euler ODE on the adapter's grid and the
    pipeline's own loop agree, which pins the time, shift, guidance and latent-scaling conventions."""
    model = load_model(str(folders[name]), OPTIONS)
    pipe = pipeline(folders, name)
    noise = initial_noise(model.latent_shape(), [3, 4])
    x, images = tempflow_sample(model, PROMPTS[:2], noise, name)
    # from prompt strings: the pipeline encodes the empty prompt in a batch of 2, tempflow once, which
    # changes the CLIP projection in the last float bits; FLUX has no empty prompt and agrees exactly
    tol = 1e-5 if name == "sd3" else 0.0
    assert (pipe_sample(pipe, name, PROMPTS[:2], noise, "latent") - x).abs().max() <= tol
    assert (pipe_sample(pipe, name, PROMPTS[:2], noise, "pt") - images).abs().max() <= tol
    if name == "sd3":  # with the same embeddings the two samplers agree to the bit
        cond, u = model.encode_prompts(PROMPTS[:2]), model.uncond()
        embeds = {"prompt_embeds": cond.tokens, "pooled_prompt_embeds": cond.pooled,
                  "negative_prompt_embeds": u.tokens.expand(2, -1, -1),
                  "negative_pooled_prompt_embeds": u.pooled.expand(2, -1)}
        assert torch.equal(pipe_sample(pipe, name, [], noise, "latent", **embeds), x)


def test_flux_packing_round_trip_and_guidance_one_call():
    x = torch.randn(2, 4, 6, 8)
    assert pack(x).shape == (2, 12, 16) and torch.equal(unpack(pack(x), 6, 8), x)
    assert torch.equal(pack(x)[0, 0], x[0, :, :2, :2].reshape(-1))  # a token is a 2x2 patch, channels outermost


# ---- training through tempflow.training.run ---------------------------------------------------------------------

ALGOS = {
    "tempflow": ["algorithm.name=tempflow_grpo", "rollout.seeds_per_prompt=1", "algorithm.children=2",
                 "algorithm.branch_points=[0,1]", "advantage.group_by=seed_step", "algorithm.clip_range=0.2"],
    "flow_grpo": ["algorithm.name=flow_grpo", "rollout.seeds_per_prompt=3", "advantage.group_by=prompt",
                  "algorithm.noise_weighting=false", "model_options.gradient_checkpointing=true",
                  "algorithm.clip_range=0.2"],
    "nft": ["algorithm.name=nft", "rollout.seeds_per_prompt=2", "advantage.group_by=prompt", "algorithm.timesteps=2"],
    "awm": ["algorithm.name=awm", "rollout.seeds_per_prompt=2", "advantage.group_by=prompt", "algorithm.timesteps=2",
            "algorithm.first_index=0", "algorithm.last_fraction=1.0"],
    "tempflow_nft": ["algorithm.name=tempflow_nft", "rollout.seeds_per_prompt=1", "algorithm.children=2",
                     "algorithm.branch_points=[0,1]", "advantage.group_by=seed_step", "algorithm.objective=both"],
}
_RUNS: dict[tuple[str, str], tuple] = {}


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def trained(folders: dict[str, Path], tmp_path_factory, name: str, algo: str) -> tuple:
    """(trainer, run_dir, initial trainable weights, initial frozen weights) after 2 iterations; cached."""
    if (name, algo) in _RUNS:
        return _RUNS[(name, algo)]
    root = tmp_path_factory.mktemp(f"{name}_{algo}")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    overrides = [f"model={folders[name]}", f"model_options.resolution={RES}", "model_options.dtype=fp32",
                 f"model_options.max_sequence_length={T5_TOKENS}", "reward=jpeg_incompressibility",
                 f"prompts={root / 'prompts.txt'}", "iterations=2", f"rollout.num_steps={STEPS}",
                 "rollout.prompts_per_iter=2", f"rollout.guidance={GUIDANCE[name]}", "lora.rank=4", "lora.alpha=8",
                 "optim.lr=1e-2", "optim.minibatch=8", "algorithm.kl_beta=0.01", "ema.every=1", "ema.decay=0.5",
                 "eval.every=2", f"eval.prompts={root / 'prompts.txt'}", "eval.limit=2",
                 "eval.num_steps=2", f"eval.guidance={GUIDANCE[name]}", *ALGOS[algo]]
    cfg = load_config(TrainConfig, None, overrides)
    seen: dict = {}

    class Recording(train_mod.Trainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            seen.update(trainer=self, params={n: p.detach().clone() for n, p in self.named},
                        frozen={i: _state(m) for i, m in enumerate(self.model.frozen_modules())})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "Trainer", Recording)
        train_mod.train(cfg, root / "run")
    _RUNS[(name, algo)] = (seen["trainer"], root / "run", seen["params"], seen["frozen"])
    return _RUNS[(name, algo)]


@pytest.mark.parametrize("name,algo", [(m, a) for m in ("sd3", "flux") for a in ALGOS])
def test_two_iterations_train_only_the_lora(folders, tmp_path_factory, name, algo):
    tr, run, before, frozen = trained(folders, tmp_path_factory, name, algo)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "optimizer_steps" in r]
    assert len(train_rows) == 2 and all(r["optimizer_steps"] >= 1 for r in train_rows)
    assert all(abs(r["ratio_first"] - 1.0) < 1e-5 for r in train_rows if "ratio_first" in r)  # fully on-policy
    assert any("eval_reward" in r for r in rows)  # evaluation of a prompts file: the reward mean
    assert before and all("lora_" in n for n in before)
    assert all(not torch.equal(p, before[n]) for n, p in tr.named)  # every adapter weight moved
    for n, p in tr.model.transformer.named_parameters():  # the base weights did not
        if "lora_" not in n:
            assert not p.requires_grad
    base = PIPES[name].from_pretrained(Path(tr.cfg.model)).transformer.state_dict()
    for k, v in tr.model.transformer.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base[k.replace(".base_layer", "")]), k
    for i, m in enumerate(tr.model.frozen_modules()):  # text encoders and VAE
        assert all(torch.equal(v, frozen[i][k]) for k, v in m.state_dict().items())
    assert (run / "final" / "lora" / LORA_FILE).is_file() and (run / "final" / "tempflow_adapter.json").is_file()


# ---- export --------------------------------------------------------------------------------------------------


def ema_sample(tr, name: str, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad(), tr.ema_weights():
        return tempflow_sample(tr.model, PROMPTS[:2], noise, name)


@pytest.mark.parametrize("name,algo", [("sd3", "tempflow"), ("flux", "flow_grpo")])
def test_exported_lora_loads_into_diffusers(folders, tmp_path_factory, tmp_path, name, algo):
    tr, run, _, _ = trained(folders, tmp_path_factory, name, algo)
    out = export_run(run, tmp_path / "lora")
    assert (out / LORA_FILE).is_file()
    noise = initial_noise(tr.model.latent_shape(), [7, 8])
    _, ours = ema_sample(tr, name, noise)
    pipe = pipeline(folders, name)
    base = pipe_sample(pipe, name, PROMPTS[:2], noise, "pt")
    pipe.load_lora_weights(out)
    theirs = pipe_sample(pipe, name, PROMPTS[:2], noise, "pt")
    assert (theirs - ours).abs().max() < 1e-5
    assert (base - ours).abs().max() > 1e-3  # the adapter changes the images


def test_merged_export_and_final_folder(folders, tmp_path_factory, tmp_path):
    tr, run, _, _ = trained(folders, tmp_path_factory, "sd3", "tempflow")
    noise = initial_noise(tr.model.latent_shape(), [9, 10])
    _, ours = ema_sample(tr, "sd3", noise)
    merged = export_run(run, tmp_path / "merged", merged=True)
    pipe = StableDiffusion3Pipeline.from_pretrained(merged)
    pipe.set_progress_bar_config(disable=True)
    assert (pipe_sample(pipe, "sd3", PROMPTS[:2], noise, "pt") - ours).abs().max() < 1e-5
    final = load_model(str(run / "final"), OPTIONS)  # tempflow sample / eval --model RUN_DIR/final
    assert (tempflow_sample(final, PROMPTS[:2], noise, "sd3")[1] - ours).abs().max() < 1e-5
    with torch.no_grad(), tr.ema_weights():
        fused = tr.model.merged()
    assert not fused.trainable_named_parameters()
    assert (tempflow_sample(fused, PROMPTS[:2], noise, "sd3")[1] - ours).abs().max() < 1e-5
    with pytest.raises(TempflowError, match="not empty"):
        export_run(run, tmp_path / "merged")


def test_export_command(folders, tmp_path_factory, tmp_path, capsys):
    from tempflow.cli import main

    _, run, _, _ = trained(folders, tmp_path_factory, "flux", "tempflow")
    assert main(["export", str(run), "--out", str(tmp_path / "lora")]) == 0
    assert (tmp_path / "lora" / LORA_FILE).is_file() and "load_lora_weights" in capsys.readouterr().out
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "has no final/" in capsys.readouterr().err


def test_full_finetuning_trains_the_transformer_and_exports_merged(folders, tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    cfg = load_config(TrainConfig, None, [
        f"model={folders['sd3']}", f"model_options.resolution={RES}", "model_options.dtype=fp32",
        f"model_options.max_sequence_length={T5_TOKENS}", "reward=jpeg_incompressibility",
        f"prompts={tmp_path / 'p.txt'}", "iterations=1", f"rollout.num_steps={STEPS}", "rollout.prompts_per_iter=2",
        "rollout.seeds_per_prompt=1", "algorithm.children=2", "algorithm.branch_points=[0]", "lora.enabled=false",
        "optim.lr=1e-3", "eval.every=0", "ema.every=1", "ema.decay=0.0"])
    final = train_mod.train(cfg, tmp_path / "run")
    assert (final / "model_index.json").is_file() and not (final / "lora").exists()
    with pytest.raises(TempflowError, match="--merged"):
        export_run(tmp_path / "run", tmp_path / "lora")
    merged = export_run(tmp_path / "run", tmp_path / "merged", merged=True)
    trained_w = PIPES["sd3"].from_pretrained(merged).transformer.state_dict()
    base_w = PIPES["sd3"].from_pretrained(folders["sd3"]).transformer.state_dict()
    assert any(not torch.equal(v, base_w[k]) for k, v in trained_w.items())
    with pytest.raises(ConfigError, match="float32 weights"):
        load_model(str(folders["sd3"]), ModelOptions(dtype="bf16", resolution=RES)).prepare_finetune(False)


def test_export_errors(tmp_path):
    with pytest.raises(TempflowError, match="has no final/"):
        export_run(tmp_path, tmp_path / "out")
    (tmp_path / "final").mkdir()
    with pytest.raises(TempflowError, match="--merged"):
        export_run(tmp_path, tmp_path / "out")


def test_shapes_run_exports_its_transformer_lora(tiny_model_dir, tmp_path):
    overrides = [f"model={tiny_model_dir}", "iterations=1", "rollout.prompts_per_iter=2", "rollout.num_steps=3",
                 "algorithm.children=2", "rollout.seeds_per_prompt=1", "algorithm.branch_sample=0", "eval.every=0",
                 "lora.enabled=true", "lora.rank=4", "lora.alpha=8", "optim.lr=1e-2", "ema.every=1", "ema.decay=0.5"]
    seen = {}

    class Recording(train_mod.Trainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            seen["trainer"] = self

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "Trainer", Recording)
        train_mod.train(load_config(TrainConfig, "configs/shapes/tempflow.yaml", overrides), tmp_path / "run")
    out = export_run(tmp_path / "run", tmp_path / "lora")
    fresh = load_model(tiny_model_dir)
    assert isinstance(seen["trainer"].model, TrainableFlowModel)
    fresh.transformer.load_lora_adapter(str(out), prefix="transformer", weight_name=LORA_FILE)
    tr, x, t = seen["trainer"], torch.randn(2, 3, 16, 16), torch.tensor([0.7, 0.3])
    cond = fresh.encode_prompts(["a red circle", "two squares"])
    with torch.no_grad(), tr.ema_weights():
        expected = tr.model.velocity(x, t, cond, 3.0)
    assert torch.allclose(fresh.velocity(x, t, cond, 3.0), expected, atol=1e-5)
    merged = export_run(tmp_path / "run", tmp_path / "merged", merged=True)
    assert (merged / "model_index.json").is_file() and not (merged / "lora").exists()


# ---- loading by hub id, options and presets ----------------------------------------------------------------


def test_hub_ids_go_through_from_pretrained(folders, monkeypatch):
    import huggingface_hub

    def offline(repo_id, filename, **_):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ModelLoadError, match="could not be fetched from the Hugging Face hub"):
        load_model("someone/some-model")
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **_: str(
        folders["sd3"] / filename))
    real = StableDiffusion3Pipeline.from_pretrained.__func__

    def from_pretrained(cls, name_or_path, **kwargs):
        calls.append(name_or_path)
        return real(cls, folders["sd3"], **kwargs)

    monkeypatch.setattr(StableDiffusion3Pipeline, "from_pretrained", classmethod(from_pretrained))
    model = load_model("stabilityai/stable-diffusion-3.5-medium", OPTIONS)
    assert calls == ["stabilityai/stable-diffusion-3.5-medium"] and model.latent_shape() == (4, 16, 16)


@pytest.mark.parametrize("override,message", [
    ("model_options.dtpye=fp16", "unknown config key 'model_options.dtpye'"),
    ("model_options.dtype=fp8", "model_options.dtype must be one of"),
    ("model_options.device=tpu", "model_options.device must be"),
    ("model_options.resolution=-1", "must be >= 0"),
])
def test_model_options_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, [override])


def test_shapes_model_refuses_pipeline_options(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="does not apply to the shapes model"):
        load_model(tiny_model_dir, ModelOptions(resolution=64))


@pytest.mark.parametrize("preset", sorted(str(p) for d in ("sd35m", "flux") for p in Path("configs", d).glob("*.yaml")
                                           if p.name != "base.yaml"))
def test_real_model_presets_load(preset):
    cfg = load_config(TrainConfig, preset)
    assert cfg.model_options.resolution == (1024 if "flux" in preset else 512)  # TempFlow-GRPO's FLUX runs
    assert cfg.model_options.max_sequence_length == 128 and cfg.lora.init == "gaussian"
    assert cfg.lora.rank == 32 and cfg.lora.alpha == 64
    assert cfg.optim.lr == 3e-4 and cfg.optim.weight_decay == 1e-4 and cfg.optim.grad_clip == 1.0
    assert cfg.rollout.num_steps == (14 if cfg.algorithm.name == "awm" else 10)
    branching = cfg.algorithm.name in ("tempflow_grpo", "tempflow_nft")
    images = cfg.rollout.seeds_per_prompt * (cfg.algorithm.children if branching else 1)
    assert images == 24  # images per prompt (TempFlow: per branch point)
    if cfg.algorithm.name in ("nft", "awm", "tempflow_nft"):  # without CFG, or FLUX's own guidance input
        assert cfg.rollout.guidance == cfg.algorithm.train_guidance == cfg.eval.guidance
        assert cfg.rollout.guidance == (3.5 if "flux" in preset else 1.0)


def test_conditioning_rows_carry_both_fields():
    c = Conditioning(torch.randn(3, 5, 4), torch.randn(3, 2))
    both = Conditioning.cat([c.index(torch.tensor([2])), c.index(slice(0, 1))])
    assert torch.equal(both.tokens, c.tokens[[2, 0]]) and torch.equal(both.pooled, c.pooled[[2, 0]])


def _lora_grad(folders: dict[str, Path], dtype: str, scale: float) -> torch.Tensor:
    """LoRA gradient of one clipped-surrogate step at 128 px (16k latent elements), SD3."""
    import tempflow.models.pipeline as pipeline_mod
    from tempflow.math.losses import policy_loss
    from tempflow.math.sde import sde_step

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline_mod, "FP16_GRAD_SCALE", scale)
        model = load_model(str(folders["sd3"]), ModelOptions(resolution=128, dtype=dtype, max_sequence_length=8))
    torch.manual_seed(0)
    model.prepare_finetune(True, 4, 8.0)
    for n, p in model.trainable_named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.02)
    x, sig = torch.randn(2, *model.latent_shape(), generator=torch.Generator().manual_seed(1)), model.sigmas(10)
    cond = model.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        old = sde_step(x, model.velocity(x, sig[0].expand(2), cond, 4.5), sig[0], sig[1], 0.7,
                       generator=torch.Generator().manual_seed(2))
    new = sde_step(x, model.velocity(x, sig[0].expand(2), cond, 4.5), sig[0], sig[1], 0.7, prev=old.sample)
    policy_loss(new.log_prob, old.log_prob, torch.tensor([1.0, -1.0]), 1e-4).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.trainable_parameters()])


def test_float16_lora_gradients_are_scaled_past_underflow(folders):
    exact = _lora_grad(folders, "fp32", 2.0**16)
    scaled = _lora_grad(folders, "fp16", 2.0**16)
    unscaled = _lora_grad(folders, "fp16", 1.0)
    assert (scaled - exact).norm() / exact.norm() < 0.02
    assert (unscaled - exact).norm() / exact.norm() > 0.2  # what float16 does without the scale
