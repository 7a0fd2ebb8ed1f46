"""Stable Diffusion 3 / 3.5 (Medium, Large) as a tempflow model, over diffusers' StableDiffusion3Pipeline.

- Text: the pipeline's own ``encode_prompt`` (two CLIP encoders and T5): tokens (B, 77 + L, 4096) and
  pooled (B, 2048); the trainer caches them per prompt, and the empty prompt of classifier-free
  guidance is encoded once and kept.
- Time: tempflow's t is the pipeline's sigma (t = 1 noise); the transformer takes timestep = 1000 t.
- Grid: the scheduler's own, built by a copy of it (static shift from its config: 3.0 for SD3.5).
- Guidance: classifier-free, one forward of the doubled batch [uncond, cond], v = v_u + g (v_c - v_u),
  in float32 (the pipeline's order and formula); `uncond_detached()` keeps the gradient of a trained
  velocity to the conditional half (algorithm.detach_uncond).
- x: the pipeline's latents (B, 16, H/8, W/8): VAE latents minus shift_factor, times scaling_factor.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline
from torch import nn

from tempflow.models.base import Conditioning, GuidanceGradient, ModelOptions, guided_velocity
from tempflow.models.pipeline import PipelineFlowModel, scheduler_sigmas, shift_mu

# the papers' "attention projections": the joint attention of every block (image and text streams), as
# Flow-GRPO's and TempFlow-GRPO's scripts name them. The "attn." prefix leaves out the image-only second
# attention (attn2) of SD3.5's first blocks: SD3.5-Medium at rank 32 gets 190 adapters, 18.7 M parameters
# (the scripts' 191 less one that receives no gradient, see lora_target_names), instead of 242, 23.8 M.
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out")


class SD3FlowModel(GuidanceGradient, PipelineFlowModel):
    """StableDiffusion3Pipeline behind the FlowModel protocol; `load(hub id or folder, options)`."""

    pipeline_class = StableDiffusion3Pipeline
    default_lora_targets = LORA_TARGETS
    gpu_dtype = torch.float16
    default_max_sequence_length = 256

    def __init__(self, pipe: StableDiffusion3Pipeline, options: ModelOptions, source: str) -> None:
        super().__init__(pipe, options, source)
        self._uncond: Conditioning | None = None

    def text_encoders(self) -> list[nn.Module]:
        p = self.pipe
        return [m for m in (p.text_encoder, p.text_encoder_2, p.text_encoder_3) if m is not None]

    def default_resolution(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def check_resolution(self, resolution: int) -> None:
        step = self.pipe.vae_scale_factor * self.transformer.config.patch_size
        if resolution % step:
            raise ValueError(f"resolution {resolution} must be a multiple of {step} (VAE factor x patch size), "
                             f"e.g. {max(step, resolution - resolution % step)}")

    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.pipe.vae_scale_factor
        return (self.transformer.config.in_channels, side, side)

    def _encode(self, prompts: list[str]) -> Conditioning:
        tokens, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return Conditioning(tokens, pooled)  # (B, 77 + L, D), (B, P)

    def _grid(self, num_steps: int) -> torch.Tensor:
        config = self.pipe.scheduler.config
        mu = None
        if config.get("use_dynamic_shifting"):  # as the pipeline: mu from the image token count
            _, h, w = self.latent_shape()
            p = self.transformer.config.patch_size
            mu = shift_mu((h // p) * (w // p), config, max_shift=1.16)
        return scheduler_sigmas(self.pipe.scheduler, num_steps, mu=mu)

    def uncond(self) -> Conditioning:
        """The empty prompt's conditioning (1 row), encoded once."""
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        return self._uncond

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Unguided velocity (B, C, h, w) in the weights' dtype at times t (B,)."""
        return self.transformer(hidden_states=x, timestep=t * 1000.0, encoder_hidden_states=cond.tokens,
                                pooled_projections=cond.pooled, return_dict=False)[0]

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float) -> torch.Tensor:
        """Classifier-free guided velocity (B, C, h, w) float32; one forward of the doubled batch."""
        x = x.to(self.device, self.weight_dtype)
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
        if guidance == 1.0:
            return self._scaled_output(self.forward(x, t, cond).float())
        n, u = x.shape[0], self.uncond()
        uncond = Conditioning(u.tokens.expand(n, -1, -1), u.pooled.expand(n, -1))
        v = self.forward(torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([uncond, cond])).float()
        v_uncond, v_cond = v.chunk(2)
        return self._scaled_output(guided_velocity(v_uncond, v_cond, guidance, self.detach_uncond))
