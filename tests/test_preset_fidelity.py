"""The real-model presets against the published training scripts (docs/real_models.md, "The presets
beside the references"): SD3.5's LoRA targets and their size at the real configuration (built on the
meta device, nothing downloaded), the Gaussian LoRA init, the CFG-detach switch of the trained velocity,
the float32 VAE under float16 weights, and the preset values themselves."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.utils import logging as diffusers_logging
from safetensors import safe_open
from transformers.utils import logging as transformers_logging

from diffusers_tiny import PROMPTS, RES, T5_TOKENS, build_flux, build_sd3
from tempflow.algorithms.base import Policy, Units
from tempflow.algorithms.flow_grpo import FlowGRPO
from tempflow.config import load_config
from tempflow.errors import ConfigError
from tempflow.models import ModelOptions, load_model
from tempflow.models.base import guided_velocity
from tempflow.models.flux import LORA_TARGETS as FLUX_TARGETS
from tempflow.models.lora import LORA_INITS, lora_target_names, peft_init_weights
from tempflow.models.pipeline import vae_dtype
from tempflow.models.sd3 import LORA_TARGETS as SD3_TARGETS
from tempflow.training.config import TrainConfig
from tempflow.training.distributed import PolicyModule

diffusers_logging.set_verbosity_error()
transformers_logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)

OPTIONS = ModelOptions(resolution=RES, dtype="fp32", max_sequence_length=T5_TOKENS)
# the published transformer configurations (their config.json files), built without weights
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipes")
    return {"sd3": build_sd3(root / "sd3"), "flux": build_flux(root / "flux")}


def lora_size(transformer: torch.nn.Module, suffixes: list[str], rank: int = 32) -> tuple[int, int]:
    """(adapted modules, LoRA parameters at `rank`) of `transformer` for these target suffixes."""
    names = lora_target_names(transformer, suffixes)
    modules = dict(transformer.named_modules())
    return len(names), sum(rank * (modules[n].in_features + modules[n].out_features) for n in names)


# ---- LoRA targets and init -------------------------------------------------------------------------------


def test_sd35_medium_lora_is_the_joint_attention_only():
    """The scripts' 8 "attn.*" suffixes: 191 modules, 18.8 M parameters at rank 32, less the last block's
    text query (no gradient reaches it: 190, 18.7 M); without the prefix SD3.5's attn2 joined (242, 23.8 M)."""
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD35_MEDIUM)
    assert lora_size(transformer, list(SD3_TARGETS)) == (190, 18_677_760)
    assert not any("attn2" in n for n in lora_target_names(transformer, list(SD3_TARGETS)))
    every = [n for n, m in transformer.named_modules()
             if isinstance(m, torch.nn.Linear) and any(n.endswith("." + s) for s in SD3_TARGETS)]
    assert len(every) == 191 and 191 * 32 * (1536 + 1536) == 18_776_064  # the scripts' count, dead one included
    assert lora_size(transformer, [s.removeprefix("attn.") for s in SD3_TARGETS]) == (242, 23_789_568)


def test_flux_dev_lora_targets_are_the_scripts_342_modules():
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_DEV)
    assert lora_size(transformer, list(FLUX_TARGETS)) == (342, 89_653_248)


@pytest.mark.parametrize("init", LORA_INITS)
def test_lora_init_sets_the_a_matrices(folders, init):
    model = load_model(str(folders["sd3"]), OPTIONS)
    torch.manual_seed(0)
    rank = 4
    model.prepare_finetune(True, rank, 8.0, init=init)
    a = [p for n, p in model.trainable_named_parameters() if "lora_A" in n]
    b = [p for n, p in model.trainable_named_parameters() if "lora_B" in n]
    assert a and all(torch.count_nonzero(p) == 0 for p in b)  # the adapted model starts as the base
    values = torch.cat([p.detach().flatten() for p in a])
    if init == "gaussian":  # peft's "gaussian": N(0, 1/rank^2)
        assert abs(values.std().item() - 1 / rank) < 0.1 / rank
    else:  # Kaiming-uniform: |A| <= 1 / sqrt(fan_in)
        assert all(p.abs().max() <= p.shape[1] ** -0.5 + 1e-6 for p in a)
    assert model._lora_settings["init"] == init


def test_lora_init_is_validated():
    assert peft_init_weights("default") is True and peft_init_weights("gaussian") == "gaussian"
    with pytest.raises(ConfigError, match="lora.init must be one of default, gaussian"):
        load_config(TrainConfig, None, ["lora.init=xavier"])


def test_trainer_initialises_lora_from_the_config(tiny_model_dir, tmp_path):
    from tempflow.training.loop import Trainer

    cfg = load_config(TrainConfig, None, [f"model={tiny_model_dir}", "lora.enabled=true", "lora.rank=4",
                                          "lora.init=gaussian", "iterations=1", "eval.every=0"])
    trainer = Trainer(cfg, tmp_path / "run")
    a = torch.cat([p.detach().flatten() for n, p in trainer.named if "lora_A" in n])
    assert abs(a.std().item() - 0.25) < 0.025


# ---- the unconditional half of the trained velocity ------------------------------------------------------


def test_guided_velocity_detach_keeps_values_and_moves_the_gradient():
    g = 4.5
    v_u, v_c = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    both, cond_only = guided_velocity(v_u, v_c, g), guided_velocity(v_u, v_c, g, detach_uncond=True)
    assert torch.equal(both, cond_only)
    du, dc = torch.autograd.grad(both.sum(), [v_u, v_c])
    assert torch.allclose(du, torch.full_like(du, 1 - g)) and torch.allclose(dc, torch.full_like(dc, g))
    (dc,) = torch.autograd.grad(cond_only.sum(), [v_c])
    assert torch.allclose(dc, torch.full_like(dc, g)) and cond_only.grad_fn is not None
    assert v_u.grad is None


def _lora_grad(model, fn) -> torch.Tensor:
    model.transformer.zero_grad(set_to_none=True)
    fn().backward()
    return torch.cat([p.grad.flatten() for p in model.trainable_parameters()])


def test_sd3_detached_uncond_trains_only_the_conditional_half(folders):
    """On a tiny SD3 with LoRA: detaching the unconditional half leaves the guided velocity unchanged and
    its LoRA gradient is g times the gradient of the conditional velocity alone; without it, the
    unconditional velocity's gradient enters with weight 1 - g."""
    model = load_model(str(folders["sd3"]), OPTIONS)
    torch.manual_seed(0)
    model.prepare_finetune(True, 4, 8.0)
    for n, p in model.trainable_named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    g, x, t = 4.5, torch.randn(2, *model.latent_shape()), torch.tensor([0.8, 0.4])
    cond, u = model.encode_prompts(PROMPTS[:2]), model.uncond()
    uncond = type(cond)(u.tokens.expand(2, -1, -1), u.pooled.expand(2, -1))
    w = torch.randn_like(x)
    v_both = model.velocity(x, t, cond, g)
    with model.uncond_detached():
        v_detached = model.velocity(x, t, cond, g)
    assert model.detach_uncond is False  # restored after the context
    assert torch.equal(v_both.detach(), v_detached.detach())
    grad_cond = _lora_grad(model, lambda: (w * model.velocity(x, t, cond, 1.0)).sum())
    grad_uncond = _lora_grad(model, lambda: (w * model.velocity(x, t, uncond, 1.0)).sum())
    grad_both = _lora_grad(model, lambda: (w * model.velocity(x, t, cond, g)).sum())

    def detached() -> torch.Tensor:
        with model.uncond_detached():
            return (w * model.velocity(x, t, cond, g)).sum()

    grad_detached = _lora_grad(model, detached)
    scale = grad_cond.abs().max()
    assert (grad_detached - g * grad_cond).abs().max() <= 1e-4 * g * scale
    assert (grad_both - (g * grad_cond + (1 - g) * grad_uncond)).abs().max() <= 1e-4 * g * scale
    assert (grad_both - grad_detached).abs().max() > 1e-2 * scale


def _flow_grpo(tiny_model, detach: bool, guidance: float = 3.0) -> tuple[FlowGRPO, Policy]:
    cfg = load_config(TrainConfig, None, [
        "algorithm.name=flow_grpo", "advantage.group_by=prompt", "rollout.seeds_per_prompt=2",
        "rollout.num_steps=3", f"rollout.guidance={guidance}", "algorithm.kl_beta=0", "algorithm.clip_range=0.5",
        f"algorithm.detach_uncond={str(detach).lower()}"])
    params = tiny_model.trainable_parameters()
    policy = Policy(tiny_model, PolicyModule(tiny_model, params), params, "no", 64)
    return FlowGRPO(cfg, policy), policy


def test_flow_grpo_loss_detaches_the_uncond_half_when_asked(tiny_model):
    """The switch reaches the trained velocity of the SDE loss: same loss value, another gradient."""
    tiny_model.prepare_finetune(True, 4, 8.0)
    for n, p in tiny_model.trainable_named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    cond = tiny_model.encode_prompts(["a red circle"])
    units = Units(prompt=torch.tensor([0, 0]), slot=torch.tensor([0, 1]), seed=[1, 2], prompt_seed=[1, 1])
    out = {}
    for detach in (False, True):
        algo, policy = _flow_grpo(tiny_model, detach)
        batch = algo.rollout(units, cond, 0, random.Random(0))
        idx = torch.arange(len(batch))
        adv = torch.where(batch.row_image == 0, 1.0, -1.0)
        tiny_model.zero_grad(set_to_none=True)
        loss, _ = algo.loss(batch, idx, adv, cond)
        loss.backward()
        out[detach] = (loss.detach(), torch.cat([p.grad.flatten() for p in policy.params]))
        assert tiny_model.detach_uncond is False
    assert torch.allclose(out[False][0], out[True][0])
    assert (out[False][1] - out[True][1]).abs().max() > 1e-3 * out[False][1].abs().max()


def test_detach_uncond_is_refused_without_an_unconditional_half(folders, tiny_model):
    with pytest.raises(ConfigError, match="needs classifier-free guidance"):
        load_config(TrainConfig, None, ["algorithm.name=flow_grpo", "advantage.group_by=prompt",
                                        "rollout.guidance=1", "algorithm.detach_uncond=true"])
    with pytest.raises(ConfigError, match="needs classifier-free guidance"):  # TempFlow-GRPO: when it starts
        cfg = load_config(TrainConfig, None, ["rollout.guidance=1", "algorithm.detach_uncond=true"])
        from tempflow.algorithms.tempflow_grpo import TempFlowGRPO

        params = tiny_model.trainable_parameters()
        TempFlowGRPO(cfg, Policy(tiny_model, PolicyModule(tiny_model, params), params, "no", 64))
    flux = load_model(str(folders["flux"]), OPTIONS)  # guidance is an input of FLUX.1-dev's transformer
    flux.prepare_finetune(True, 4, 8.0)
    cfg = load_config(TrainConfig, None, ["algorithm.name=flow_grpo", "advantage.group_by=prompt",
                                          "rollout.guidance=3.5", "algorithm.detach_uncond=true"])
    params = flux.trainable_parameters()
    with pytest.raises(ConfigError, match="no unconditional half"):
        FlowGRPO(cfg, Policy(flux, PolicyModule(flux, params), params, "no", 64))


# ---- the VAE under float16 weights -----------------------------------------------------------------------


def test_vae_dtype_follows_the_weights():
    assert vae_dtype(torch.float16) == torch.float32
    assert vae_dtype(torch.bfloat16) == torch.bfloat16 and vae_dtype(torch.float32) == torch.float32


def test_float16_sd3_decodes_in_float32_and_saves_float16(folders, tmp_path):
    model = load_model(str(folders["sd3"]), ModelOptions(resolution=RES, dtype="fp16", max_sequence_length=T5_TOKENS))
    assert model.transformer.dtype == torch.float16 and model.pipe.vae.dtype == torch.float32
    with warnings.catch_warnings():  # newer diffusers call it dtype; torch_dtype works in every version
        warnings.filterwarnings("ignore", category=FutureWarning)
        pipe = StableDiffusion3Pipeline.from_pretrained(folders["sd3"], torch_dtype=torch.float16)
    vae = pipe.vae.to(torch.float32)  # the float16 weights, decoding in float32
    x = torch.randn(2, *model.latent_shape())
    z = x / vae.config.scaling_factor + vae.config.shift_factor
    with torch.no_grad():
        expected = ((vae.decode(z, return_dict=False)[0] + 1) / 2).clamp(0, 1)
    assert torch.equal(model.decode(x), expected)
    model.save(tmp_path / "model")
    with safe_open(str(tmp_path / "model" / "vae" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # the folder keeps one dtype
    assert model.pipe.vae.dtype == torch.float32


# ---- the preset values (docs/real_models.md) -------------------------------------------------------------

PRESETS = {
    "configs/sd35m/flow_grpo_pickscore.yaml": dict(resolution=512, beta=0.001, std="batch", detach=False, eval=40),
    "configs/sd35m/flow_grpo_geneval.yaml": dict(resolution=512, beta=0.004, std="batch", detach=False, eval=40),
    "configs/sd35m/tempflow_pickscore.yaml": dict(resolution=512, beta=0.001, std="group", detach=False, eval=40),
    "configs/sd35m/tempflow_geneval.yaml": dict(resolution=512, beta=0.004, std="group", detach=False, eval=40),
    "configs/flux/flow_grpo_hpsv3.yaml": dict(resolution=1024, beta=0.004, std="batch", detach=False, eval=50),
    "configs/flux/tempflow_hpsv3.yaml": dict(resolution=1024, beta=0.004, std="group", detach=False, eval=50),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_likelihood_presets_hold_the_documented_values(preset):
    want, cfg = PRESETS[preset], load_config(TrainConfig, preset)
    assert cfg.model_options.resolution == want["resolution"] and cfg.model_options.max_sequence_length == 128
    assert cfg.algorithm.kl_beta == want["beta"] and cfg.advantage.std == want["std"]
    assert cfg.algorithm.detach_uncond == want["detach"] and cfg.eval.num_steps == want["eval"]
    assert cfg.lora.init == "gaussian" and cfg.lora.targets == [] and (cfg.lora.rank, cfg.lora.alpha) == (32, 64)
    assert cfg.algorithm.noise_level == (0.9 if "flux" in preset else 0.7)
    assert cfg.algorithm.clip_range == 1e-4 and cfg.rollout.num_steps == 10
    assert cfg.model_options.dtype == ("bf16" if "flux" in preset else "fp16")
