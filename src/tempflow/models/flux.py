"""FLUX.1 (dev) as a tempflow model, over diffusers' FluxPipeline.

- Text: the pipeline's own ``encode_prompt``: T5 tokens (B, L, 4096) and the CLIP pooled embedding
  (B, 768). FLUX's text ids are zeros of shape (L, 3), the same for every prompt, so they are made
  from the token count inside ``velocity`` and need no field in Conditioning.
- Guidance: FLUX.1-dev is guidance-distilled: the scale goes to the transformer's guidance embedding,
  one forward per sample, no doubled batch and no empty prompt. (A checkpoint without a guidance
  embedding, such as FLUX.1-schnell, ignores it.)
- Time: tempflow's t is the pipeline's sigma; the transformer takes timestep = t (it scales by 1000
  itself), rounded as the pipeline rounds it: (1000 t in the latents' dtype) / 1000.
- Grid: the scheduler's own with the pipeline's dynamic shift: sigmas linspace(1, 1/T, T) shifted by
  mu, which grows linearly with the image token count (base_shift at base_image_seq_len up to
  max_shift at max_image_seq_len, from the scheduler config).
- x: tempflow keeps the latents unpacked, (B, 16, H/8, W/8) like SD3, scaled as the pipeline's
  (VAE latents minus shift_factor, times scaling_factor); ``velocity`` packs them into FLUX's 2x2
  patch tokens (B, H/16 * W/16, 64) with their image ids and unpacks the output. Packing is a
  permutation of the elements, so the SDE step and its log-probability (a mean over elements) are
  the same either way, and noise, rollouts and checkpoints keep the (B, C, H, W) shape of every model.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline
from torch import nn

from tempflow.models.base import Conditioning
from tempflow.models.pipeline import PipelineFlowModel, scheduler_sigmas, shift_mu

# attention projections of the double-stream blocks (and of the single-stream blocks' attn) plus the
# feed-forward layers of both streams
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2")


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch a token, row-major, channels outermost."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W), the inverse of pack."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """(H/2 * W/2, 3) position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


class FluxFlowModel(PipelineFlowModel):
    """FluxPipeline behind the FlowModel protocol; `load(hub id or folder, options)`."""

    cfg_batch = False  # guidance is an input of the transformer: one forward per row, counted once in NFE

    pipeline_class = FluxPipeline
    default_lora_targets = LORA_TARGETS
    gpu_dtype = torch.bfloat16
    default_max_sequence_length = 512

    def text_encoders(self) -> list[nn.Module]:
        return [m for m in (self.pipe.text_encoder, self.pipe.text_encoder_2) if m is not None]

    def default_resolution(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def check_resolution(self, resolution: int) -> None:
        step = self.pipe.vae_scale_factor * 2  # VAE factor x the 2x2 packing
        if resolution % step:
            raise ValueError(f"resolution {resolution} must be a multiple of {step} (VAE factor x 2), "
                             f"e.g. {max(step, resolution - resolution % step)}")

    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.pipe.vae_scale_factor
        return (self.transformer.config.in_channels // 4, side, side)

    def _encode(self, prompts: list[str]) -> Conditioning:
        tokens, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        return Conditioning(tokens, pooled)  # (B, L, D), (B, P)

    def _grid(self, num_steps: int) -> torch.Tensor:
        config = self.pipe.scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        _, h, w = self.latent_shape()
        return scheduler_sigmas(self.pipe.scheduler, num_steps, sigmas=sigmas,
                                mu=shift_mu((h // 2) * (w // 2), config, max_shift=1.15))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float) -> torch.Tensor:
        """Velocity (B, C, h, w) float32 with the guidance scale as the transformer's guidance input."""
        b, _, h, w = x.shape
        tokens = pack(x.to(self.device, self.weight_dtype))  # (B, h/2 * w/2, 4C)
        t = torch.as_tensor(t, dtype=torch.float32, device=tokens.device).expand(b)
        timestep = (t * 1000.0).to(tokens.dtype) / 1000.0  # the pipeline's rounding of its timesteps
        g = None
        if self.transformer.config.guidance_embeds:
            g = torch.full((b,), float(guidance), dtype=torch.float32, device=tokens.device)
        out = self.transformer(
            hidden_states=tokens, timestep=timestep, guidance=g, pooled_projections=cond.pooled,
            encoder_hidden_states=cond.tokens, txt_ids=torch.zeros(cond.tokens.shape[1], 3).to(tokens),
            img_ids=image_ids(h, w).to(tokens), return_dict=False)[0]
        return self._scaled_output(unpack(out.float(), h, w))
