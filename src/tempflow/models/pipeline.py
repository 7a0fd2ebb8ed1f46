"""What the SD3 and FLUX adapters share: a diffusers pipeline behind the FlowModel protocol.

The pipeline object keeps its components (text encoders, tokenizers, VAE, scheduler, transformer) and
supplies three things: prompt encoding (its own ``encode_prompt``), the scheduler configuration the
sigma grid is built from, and saving / LoRA loading in diffusers' formats. Sampling never goes
through the pipeline's loop: tempflow's ODE/SDE steps call ``velocity`` on its own grid.

Devices and precision: the transformer lives on ``options.device`` in ``options.dtype``; the text
encoders and the VAE too, or (``options.offload``) on the CPU except while they run. With float16
weights the VAE is kept (and decodes) in float32, as Flow-GRPO's and TempFlow-GRPO's scripts keep it:
float16's range is too small for the decoder's activations. LoRA weights are kept in float32 whatever
the base precision (peft casts the input to them), so AdamW updates are not lost to fp16 rounding;
the SDE step math is float32 in tempflow.math.sde.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from tempflow.errors import ConfigError, PromptError
from tempflow.io import write_json
from tempflow.models.base import DTYPES, Conditioning, ModelOptions, TransformerFinetuning
from tempflow.models.lora import (
    ADAPTER_FILE,
    LORA_DIR,
    lora_target_names,
    peft_init_weights,
    save_transformer_lora,
)

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FP16_GRAD_SCALE = 2.0**16  # initial backward scale of float16 arithmetic (see _GradScale), halved on overflow


def shift_mu(image_seq_len: int, config: Any, max_shift: float) -> float:
    """Resolution-dependent shift: mu grows linearly with the image token count, from base_shift at
    base_image_seq_len to max_shift at max_image_seq_len (scheduler config keys, with the pipelines' defaults)."""
    lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    return base + (top - base) * (image_seq_len - lo) / (hi - lo)


def scheduler_sigmas(scheduler: Any, num_steps: int, sigmas: np.ndarray | None = None,
                     mu: float | None = None) -> torch.Tensor:
    """The sigma grid (num_steps + 1,) float32 of a fresh copy of `scheduler` after set_timesteps: the
    pipeline's own grid, shift and terminal value included (the copy keeps the model's scheduler stateless)."""
    s = type(scheduler).from_config(scheduler.config)
    kwargs: dict[str, Any] = {"mu": mu} if mu is not None else {}
    if sigmas is not None:
        s.set_timesteps(sigmas=sigmas, device="cpu", **kwargs)
    else:
        s.set_timesteps(num_steps, device="cpu", **kwargs)
    out = s.sigmas.detach().to("cpu", torch.float32)
    if out.shape != (num_steps + 1,):
        raise ValueError(f"the scheduler made {out.shape[0] - 1} steps for num_steps={num_steps}")
    return out


def vae_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype for a model whose weights are `weight_dtype`: float32 under float16 weights (the
    decoder's activations overflow float16's range; bfloat16 has float32's range), else the weights' own."""
    return torch.float32 if weight_dtype == torch.float16 else weight_dtype


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the autocast region we are in, or None."""
    try:
        on = torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if on else None
    except (TypeError, AttributeError):  # torch < 2.4
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


class _GradScale(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` in backward.

    In float16 the gradient reaching the transformer's output is tiny (the log-probability is a mean
    over 65k latent elements at 512 px), and most of it underflows to zero in the half-precision
    backward pass. The velocity passes through this function, so the backward runs on gradients
    `scale` times larger, and hooks on the LoRA weights (float32) divide their gradients by `scale`
    again: the trainer sees the true gradient. An overflow shows up as a non-finite gradient: the
    trainer skips that update and the model halves the scale for the next forwards (as a dynamic
    loss scaler backs off; the scale does not grow again and restarts at FP16_GRAD_SCALE on resume).
    Measured on a tiny SD3 at 65k latent elements: without scaling 86% of the LoRA gradient entries
    are zero in float16 (49% relative error); with 2**16 the error is 0.4%.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class PipelineFlowModel(TransformerFinetuning):
    """A diffusers text-to-image flow pipeline as a tempflow model (see tempflow.models.sd3 and .flux)."""

    pipeline_class: ClassVar[type]  # the diffusers pipeline class (also defines the LoRA file format)
    default_lora_targets: ClassVar[tuple[str, ...]]  # module-name suffixes adapted by default
    gpu_dtype: ClassVar[torch.dtype]  # the weights' dtype of options.dtype=auto on an accelerator
    default_max_sequence_length: ClassVar[int]  # T5 tokens per prompt

    def __init__(self, pipe: Any, options: ModelOptions, source: str) -> None:
        self.pipe, self.options, self.source = pipe, options, source
        self.weight_dtype = pipe.transformer.dtype
        self.transformer = pipe.transformer  # swapped with a frozen copy inside reference() (full fine-tuning)
        self.resolution = options.resolution or self.default_resolution()
        self.max_sequence_length = options.max_sequence_length or self.default_max_sequence_length
        self.check_resolution(self.resolution)
        self._lora = False
        self._lora_settings: dict[str, Any] = {}
        self._reference: nn.Module | None = None
        self._sigmas: dict[int, torch.Tensor] = {}
        self._grad_scale = 1.0  # the backward scale of the latest forward (set by _scaled_output)
        self._fp16_scale = FP16_GRAD_SCALE  # the scale of the next float16 forwards
        pipe.set_progress_bar_config(disable=True)
        pipe.vae.to(vae_dtype(self.weight_dtype))
        for m in self.frozen_modules():
            m.requires_grad_(False).eval()
        self.transformer.requires_grad_(False).eval()
        if options.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    # ---- what each adapter defines -------------------------------------------------------------------

    def default_resolution(self) -> int:
        raise NotImplementedError

    def check_resolution(self, resolution: int) -> None:
        raise NotImplementedError

    def text_encoders(self) -> list[nn.Module]:
        raise NotImplementedError

    def _encode(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    # ---- loading, devices, modes ---------------------------------------------------------------------

    @classmethod
    def load(cls, name_or_path: str, options: ModelOptions | None = None) -> PipelineFlowModel:
        """`from_pretrained` on a hub id or a local pipeline folder, in options.dtype, moved to options.device."""
        options = options or ModelOptions()
        dtype = options.torch_dtype(cls.gpu_dtype)
        with warnings.catch_warnings():  # newer diffusers call it dtype; torch_dtype works in every version
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = cls.pipeline_class.from_pretrained(name_or_path, torch_dtype=dtype)
        return cls(pipe, options, name_or_path).to(options.torch_device())

    def frozen_modules(self) -> list[nn.Module]:
        return [*self.text_encoders(), self.pipe.vae]

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.transformer.parameters()

    def to(self, device: str | torch.device) -> PipelineFlowModel:
        """Move the transformer (and, unless offloading, the text encoders and the VAE) to `device`."""
        for m in [self.transformer, self._reference] + ([] if self.options.offload else self.frozen_modules()):
            if m is not None:
                m.to(device)
        return self

    def train(self, mode: bool = True) -> PipelineFlowModel:
        self.transformer.train(mode)
        return self

    def eval(self) -> PipelineFlowModel:
        return self.train(False)

    @contextlib.contextmanager
    def _onload(self, modules: list[nn.Module]) -> Iterator[None]:
        """With offloading, `modules` sit on the model's device only within this context."""
        if not self.options.offload:
            yield
            return
        device = self.device
        for m in modules:
            m.to(device)
        try:
            yield
        finally:
            for m in modules:
                m.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # ---- the FlowModel protocol ------------------------------------------------------------------------

    def check_prompts(self, prompts: list[str]) -> None:
        """Any text is a prompt here; only non-strings are refused (long prompts are truncated by the tokenizers)."""
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise PromptError(f"prompts must be text, got {bad[0]!r}")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Prompt embeddings on the model's device, in the weights' dtype ("" is the empty prompt)."""
        with self._onload(self.text_encoders()):
            return self._encode(list(prompts))

    def sigmas(self, num_steps: int) -> torch.Tensor:
        if num_steps not in self._sigmas:
            self._sigmas[num_steps] = self._grid(num_steps)
        return self._sigmas[num_steps].clone()

    def _grid(self, num_steps: int) -> torch.Tensor:
        raise NotImplementedError

    def _scaled_output(self, v: torch.Tensor) -> torch.Tensor:
        """The float32 velocity, through _GradScale when LoRA trains on float16 arithmetic
        (float16 weights, or float16 autocast)."""
        fp16 = self.weight_dtype == torch.float16 or _autocast_dtype(v.device.type) == torch.float16
        self._grad_scale = self._fp16_scale if fp16 and self._lora else 1.0
        if self._grad_scale == 1.0 or not v.requires_grad:
            return v
        return _GradScale.apply(v, self._grad_scale)

    def _unscale(self, grad: torch.Tensor) -> torch.Tensor:
        """Gradient hook of the LoRA weights: undo _GradScale; back off after an overflow."""
        grad = grad / self._grad_scale
        if self._grad_scale > 1.0 and not torch.isfinite(grad).all():
            self._fp16_scale = max(1.0, self._grad_scale / 2)
        return grad

    @torch.no_grad()
    def decode(self, x: torch.Tensor, batch: int = 8) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1], as the pipeline decodes: z / scaling + shift."""
        vae = self.pipe.vae
        c = vae.config
        out = []
        with self._onload([vae]):
            for z in x.split(batch):
                z = z.to(vae.device, vae.dtype) / c.scaling_factor + (c.shift_factor or 0.0)
                out.append(vae.decode(z, return_dict=False)[0].float().to(self.device))
        return ((torch.cat(out) + 1.0) / 2.0).clamp(0.0, 1.0)

    # ---- fine-tuning ---------------------------------------------------------------------------------------

    def prepare_finetune(self, lora: bool, rank: int = 32, alpha: float = 64.0,
                         targets: list[str] | None = None, init: str = "default") -> None:
        """LoRA adapters (peft; float32 weights; A initialised by `init`, one of LORA_INITS) on the default
        or given targets, or the whole transformer (full fine-tuning keeps a frozen copy as the reference
        policy)."""
        self.transformer.requires_grad_(False)
        self._lora = lora
        if lora:
            from peft import LoraConfig

            suffixes = list(targets or self.default_lora_targets)
            names = lora_target_names(self.transformer, suffixes)
            if not names:
                example = list(self.default_lora_targets[:3])
                raise ConfigError(f"lora.targets {suffixes}: no module of the transformer matches; give suffixes "
                                  f"of module names such as {example}, or [] for the model's default")
            self.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=names,
                                                    init_lora_weights=peft_init_weights(init)))
            for name, p in self.transformer.named_parameters():
                if "lora_" in name:
                    p.data = p.data.float()
                    p.requires_grad_(True)
                    p.register_hook(self._unscale)
            self._lora_settings = {"rank": rank, "alpha": alpha, "targets": suffixes, "init": init}
        else:
            if self.weight_dtype != torch.float32:  # lr 3e-4 steps vanish below 16-bit rounding of the weights
                raise ConfigError("full fine-tuning needs float32 weights (model_options.dtype=fp32; for 16-bit "
                                 "arithmetic add optim.mixed_precision=bf16), or train LoRA (lora.enabled=true)")
            self._reference = copy.deepcopy(self.transformer).requires_grad_(False)
            self.transformer.requires_grad_(True)

    def merged(self) -> PipelineFlowModel:
        """A copy with LoRA folded into a copy of the transformer (text encoders and VAE are shared)."""
        transformer = copy.deepcopy(self.pipe.transformer)
        if self._lora:
            transformer.fuse_lora()
            transformer.unload_lora()
            transformer.to(self.weight_dtype)
        pipe = self.pipeline_class(**{**self.pipe.components, "transformer": transformer.requires_grad_(False)})
        return type(self)(pipe, self.options, self.source)

    # ---- saving ---------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """A diffusers pipeline folder (``save_pretrained``) with any LoRA fused into the weights."""
        if self._lora:
            self.merged().save(path)
            return
        self.check_finite(f"model not written to {str(path)!r}")
        vae = self.pipe.vae
        vae.to(self.weight_dtype)  # the folder keeps the pipeline's one dtype (exact: the VAE was upcast)
        try:
            self.pipe.save_pretrained(Path(path), safe_serialization=True)
        finally:
            vae.to(vae_dtype(self.weight_dtype))

    def save_lora(self, path: str | Path) -> Path:
        """The adapter as `path/pytorch_lora_weights.safetensors`, for ``pipe.load_lora_weights(path)``."""
        if not self._lora:
            raise ValueError("this model has no LoRA adapter (full fine-tuning): save it whole with save()")
        return save_transformer_lora(self.pipe.transformer, path, self.pipeline_class)

    def save_trained(self, path: str | Path) -> None:
        """LoRA: the adapter (path/lora/) and a small index naming the base model; full fine-tuning: the pipeline."""
        path = Path(path)
        if not self._lora:
            self.save(path)
            return
        self.save_lora(path / LORA_DIR)
        source = Path(self.source)
        base = str(source.resolve()) if source.is_dir() else self.source
        options = {**vars(self.options), "dtype": _DTYPE_NAMES[self.weight_dtype]}  # "auto" as it resolved
        write_json(path / ADAPTER_FILE, {"_class_name": self.pipeline_class.__name__, "base": base,
                                         "options": options, "lora": self._lora_settings})

    def load_lora(self, path: str | Path) -> None:
        """Fuse a LoRA in diffusers' format (a folder holding pytorch_lora_weights.safetensors) into the weights."""
        self.pipe.load_lora_weights(str(path))
        self.pipe.fuse_lora(components=["transformer"])
        self.pipe.unload_lora_weights()
