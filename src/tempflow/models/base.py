"""The FlowModel protocol: what the sampler, the evaluator and the trainer need from a model; and the
options every model loader takes (device, weight precision, resolution, memory savers)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from tempflow.errors import ConfigError, TempflowError
from tempflow.training.guard import first_non_finite

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ModelOptions:
    """How to load a model: the `model_options` section of a training config.

    The shapes model takes device and gradient_checkpointing; the others are for diffusers pipelines.
    """

    device: str = "cpu"  # torch device of the model: cpu, cuda, cuda:1, ... or auto (cuda when there is one)
    dtype: str = "auto"  # weights: fp32 | fp16 | bf16 | auto (on a GPU the model's own: SD3 fp16, FLUX bf16; CPU fp32)
    resolution: int = 0  # image side in pixels; 0: the model's default (1024 for SD3.5 and FLUX.1)
    gradient_checkpointing: bool = False  # recompute the transformer's activations in backward: less memory
    offload: bool = False  # keep the VAE and the text encoders on the CPU except while they run
    max_sequence_length: int = 0  # T5 tokens per prompt; 0: the pipeline's default (SD3 256, FLUX 512)
    compile: bool = False  # torch.compile the flow transformer (dynamic shapes): faster calls after a warm-up

    def __post_init__(self) -> None:
        allowed = ("auto", *DTYPES)
        if self.dtype not in allowed:
            raise ConfigError(f"model_options.dtype must be one of {allowed}, got {self.dtype!r}")
        if self.resolution < 0 or self.max_sequence_length < 0:
            raise ConfigError("model_options.resolution and model_options.max_sequence_length must be >= 0 "
                              "(0: the model's default)")
        if not self.device or not (self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps", "xpu")):
            raise ConfigError(f"model_options.device must be cpu, cuda, cuda:N, mps or auto, got {self.device!r}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"model_options.device is {self.device!r} but this torch sees no CUDA GPU; set "
                              "model_options.device=cpu (or auto), or install a CUDA build of torch")
        return torch.device(self.device)

    def torch_dtype(self, gpu_default: torch.dtype) -> torch.dtype:
        """The weights' dtype; "auto" is `gpu_default` on an accelerator and float32 on the CPU."""
        if self.dtype == "auto":
            return torch.float32 if self.torch_device().type == "cpu" else gpu_default
        return DTYPES[self.dtype]


CXX_COMPILERS = ("g++", "c++", "clang++")


def compile_flow(model: torch.nn.Module) -> None:
    """Compile the model's flow transformer in place (`nn.Module.compile`, dynamic shapes).

    In place, so the module, its parameter names and what is saved stay as they were; copies made later
    (the frozen reference of full fine-tuning) are compiled copies of their own. The first calls of each
    kind (sampling, training, the reference) are traced and compiled, which takes a while; calls after
    that are faster. On the CPU the compiled kernels are C++, so a compiler must be on PATH.
    """
    transformer = getattr(model, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise ConfigError(f"model_options.compile: {type(model).__name__} has no flow transformer to compile; "
                          "set model_options.compile=false")
    device = next(transformer.parameters()).device
    if device.type == "cpu" and not any(shutil.which(c) for c in CXX_COMPILERS):
        raise ConfigError("model_options.compile on the CPU needs a C++ compiler (g++ or clang++) on PATH: "
                          "install one, or set model_options.compile=false")
    transformer.compile(dynamic=True)


@dataclass
class Conditioning:
    """Encoded prompts: token embeddings (B, L, D) and pooled embeddings (B, P)."""

    tokens: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def index(self, rows: torch.Tensor | slice) -> Conditioning:
        return Conditioning(self.tokens[rows], self.pooled[rows])

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        return Conditioning(torch.cat([p.tokens for p in parts]), torch.cat([p.pooled for p in parts]))


def guided_velocity(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance: float,
                    detach_uncond: bool = False) -> torch.Tensor:
    """Classifier-free guidance v_u + g (v_c - v_u), in the pipelines' order of operations.

    With `detach_uncond` the unconditional half is a constant for autograd: the values are the same
    to the bit, and the gradient reaches the network only through the conditional half (g times the
    incoming gradient there, 0 on the unconditional half instead of 1 - g)."""
    if detach_uncond:
        v_uncond = v_uncond.detach()
    return v_uncond + guidance * (v_cond - v_uncond)


class GuidanceGradient:
    """Models that run classifier-free guidance as one forward of a doubled batch [cond, uncond]: whether
    the trained velocity's gradient flows through the unconditional half (`algorithm.detach_uncond`)."""

    detach_uncond: bool = False  # read by `velocity` through guided_velocity

    @contextlib.contextmanager
    def uncond_detached(self, on: bool = True) -> Iterator[None]:
        """Within this context (with `on`) the unconditional half of the guided velocity is detached."""
        before = self.detach_uncond
        self.detach_uncond = on
        try:
            yield
        finally:
            self.detach_uncond = before


@runtime_checkable
class FlowModel(Protocol):
    """A text-to-image flow model in the time convention of tempflow.math.flow (t = 1 is noise)."""

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise PromptError for prompts this model cannot take."""
        ...

    def encode_prompts(self, prompts: list[str]) -> Conditioning: ...

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float) -> torch.Tensor:
        """v for a batch x (B, C, H, W) at times t (B,), classifier-free guided (one batched call)."""
        ...

    def sigmas(self, num_steps: int) -> torch.Tensor: ...

    def latent_shape(self) -> tuple[int, int, int]: ...

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) sample -> (B, 3, H, W) images in [0, 1]."""
        ...

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]: ...

    def save(self, path: str | Path) -> None: ...


@runtime_checkable
class TrainableFlowModel(FlowModel, Protocol):
    """What the trainer needs beyond sampling: trainable weights, the frozen reference, saving the result."""

    @property
    def device(self) -> torch.device: ...

    def prepare_finetune(self, lora: bool, rank: int = 32, alpha: float = 64.0,
                         targets: list[str] | None = None, init: str = "default") -> None:
        """Freeze the model, then add LoRA adapters (targets: module-name suffixes; [] or None: the model's
        own default list; init: `tempflow.models.lora.LORA_INITS`) or make the whole flow transformer
        trainable."""
        ...

    def trainable_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]: ...

    def reference(self) -> contextlib.AbstractContextManager:
        """Within this context the model is the frozen base policy (adapters disabled)."""
        ...

    def save_trained(self, path: str | Path) -> None:
        """Write the fine-tuned model as a folder that `load_model` reads; with LoRA, `path/lora/` also holds
        the adapter in diffusers' format (what `pipe.load_lora_weights` reads)."""
        ...


class TransformerFinetuning:
    """The trainable weights and the frozen reference of a model whose flow network is `self.transformer`,
    shared by the shapes model and the diffusers adapters. `prepare_finetune` sets `_lora` (adapters
    added) or `_reference` (a frozen copy kept for full fine-tuning)."""

    transformer: torch.nn.Module

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.trainable_named_parameters()]

    def check_finite(self, what: str) -> None:
        """Raise a TempflowError "WHAT: weight NAME holds NaN or infinite values" if the flow transformer
        (adapters included) has such a weight: no such model is written or used."""
        bad = first_non_finite(self.transformer.named_parameters())
        if bad is not None:
            raise TempflowError(f"{what}: weight {bad!r} holds NaN or infinite values")

    def trainable_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.transformer.named_parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within this context the model is the frozen base policy."""
        if getattr(self, "_lora", False):
            self.transformer.disable_adapters()
            try:
                yield
            finally:
                self.transformer.enable_adapters()
        elif getattr(self, "_reference", None) is not None:
            trained, self.transformer = self.transformer, self._reference
            try:
                yield
            finally:
                self.transformer = trained
        else:
            yield
