"""The built-in tiny text-to-image flow model: our text encoder + diffusers' SD3 transformer on pixels.

The flow transformer is diffusers' SD3Transformer2DModel (joint attention, adaLN, pooled text
embedding) with a small config working on RGB pixels in [-1, 1], so that the built-in model has the
same structure, attention projections and LoRA targets as SD3 / SD3.5.

On disk (a diffusers-style folder):
    model_index.json                    class name, image size, sigma shift
    transformer/                        diffusers config.json + diffusion_pytorch_model.safetensors
    text_encoder/config.json, model.safetensors
    tokenizer/vocab.json
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from tempflow.io import read_json, write_json
from tempflow.math.flow import sigma_grid
from tempflow.models.base import Conditioning, GuidanceGradient, TransformerFinetuning, guided_velocity
from tempflow.worlds.shapes.grammar import parse_prompt
from tempflow.worlds.shapes.text import TextEncoder, TextEncoderConfig, WordTokenizer, grammar_vocabulary

CLASS_NAME = "ShapesFlowModel"
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass
class ShapesModelConfig:
    image_size: int = 32  # pixels per side
    patch_size: int = 4  # pixels per token side: 32x32 -> 8x8 = 64 image tokens
    width: int = 128  # transformer width = heads * head_dim
    depth: int = 4  # joint-attention blocks
    heads: int = 4  # attention heads
    text_width: int = 64  # text token and pooled embedding size
    text_depth: int = 2  # text transformer layers
    max_tokens: int = 16  # text tokens, <bos> included
    shift: float = 3.0  # sigma shift of the sampling grid (docs/method.md section 1)
    latent_channels: int = 0  # > 0: flow in the latent space of a small VAE (as SD3); 0: on RGB pixels
    vae_channels: list[int] = field(default_factory=lambda: [16, 32, 32])  # VAE blocks; each but the last halves

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae_channels) - 1) if self.latent_channels else 1

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def channels(self) -> int:
        return self.latent_channels or 3


def build_vae(cfg: ShapesModelConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.vae_channels), layers_per_block=1,
        latent_channels=cfg.latent_channels, norm_num_groups=min(8, *cfg.vae_channels), sample_size=cfg.image_size,
    )


def build_transformer(cfg: ShapesModelConfig) -> SD3Transformer2DModel:
    if cfg.width % cfg.heads:
        raise ValueError(f"width {cfg.width} must be a multiple of heads {cfg.heads}")
    return SD3Transformer2DModel(
        sample_size=cfg.latent_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.channels,
        out_channels=cfg.channels,
        num_layers=cfg.depth,
        attention_head_dim=cfg.width // cfg.heads,
        num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.text_width,
        caption_projection_dim=cfg.width,
        pooled_projection_dim=cfg.text_width,
        pos_embed_max_size=cfg.latent_size // cfg.patch_size,
    )


class ShapesFlowModel(nn.Module, TransformerFinetuning, GuidanceGradient):
    """Text encoder + SD3 transformer over pixels; implements the FlowModel protocol."""

    def __init__(self, cfg: ShapesModelConfig, transformer: SD3Transformer2DModel | None = None,
                 vae: AutoencoderKL | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.vae = (vae if vae is not None else build_vae(cfg)) if cfg.latent_channels else None
        vocab = grammar_vocabulary()
        self.tokenizer = WordTokenizer(vocab, cfg.max_tokens)
        self.text_encoder = TextEncoder(
            TextEncoderConfig(len(vocab), cfg.max_tokens, cfg.text_width, cfg.text_depth)
        )
        self.transformer = transformer if transformer is not None else build_transformer(cfg)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise PromptError for a prompt outside the grammar (the model knows no other words)."""
        for p in prompts:
            parse_prompt(p)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Encode prompts; "" is the unconditional prompt of classifier-free guidance."""
        tokens, pooled = self.text_encoder(self.tokenizer(prompts).to(self.device))
        return Conditioning(tokens, pooled)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Unguided velocity (B, 3, H, W) at times t (B,) in [0, 1]."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        out = self.transformer(
            hidden_states=x, encoder_hidden_states=cond.tokens, pooled_projections=cond.pooled,
            timestep=t * 1000.0, return_dict=False,
        )
        return out[0]

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float) -> torch.Tensor:
        """Classifier-free guided velocity; one forward over the doubled batch when guidance != 1."""
        if guidance == 1.0:
            return self(x, t, cond)
        uncond = self.encode_prompts([""]).index(slice(0, 1))
        uncond = Conditioning(uncond.tokens.expand_as(cond.tokens), uncond.pooled.expand_as(cond.pooled))
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        v = self(torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([cond, uncond]))
        v_cond, v_uncond = v.chunk(2)
        return guided_velocity(v_uncond, v_cond, guidance, self.detach_uncond)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return sigma_grid(num_steps, self.cfg.shift)

    def latent_shape(self) -> tuple[int, int, int]:
        return (self.cfg.channels, self.cfg.latent_size, self.cfg.latent_size)

    def decode(self, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Model-space samples -> images (B, 3, H, W) in [0, 1] (through the VAE in latent mode)."""
        if self.vae is None:
            return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        c = self.vae.config
        with torch.no_grad():
            out = [self.vae.decode(z / c.scaling_factor + (c.shift_factor or 0.0)).sample for z in x.split(batch)]
        return ((torch.cat(out).float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> model space: pixels in [-1, 1], or scaled VAE latents (posterior mode)."""
        x = images * 2.0 - 1.0
        if self.vae is None:
            return x
        c = self.vae.config
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.mode()
        return (z - (c.shift_factor or 0.0)) * c.scaling_factor

    # ---- fine-tuning: trainable weights and the frozen reference policy -------------------------

    def prepare_finetune(self, lora: bool, rank: int = 32, alpha: float = 64.0,
                         targets: list[str] | None = None, init: str = "default") -> None:
        """Freeze everything, then make either LoRA adapters (peft; A initialised by `init`, one of
        LORA_INITS) or the whole transformer trainable.

        The reference policy is the frozen base: adapters disabled, or (full fine-tuning) a frozen
        copy of the transformer kept aside.
        """
        self.requires_grad_(False)
        self._lora = lora
        if lora:
            from peft import LoraConfig

            from tempflow.models.lora import lora_target_names, peft_init_weights

            names = lora_target_names(self.transformer, list(targets or DEFAULT_LORA_TARGETS))
            if not names:
                raise ValueError(f"no module of the transformer matches the LoRA targets {targets}")
            self.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=names,
                                                    init_lora_weights=peft_init_weights(init)))
            for name, p in self.transformer.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            self._reference = copy.deepcopy(self.transformer).requires_grad_(False)
            self.transformer.requires_grad_(True)

    def merged(self) -> ShapesFlowModel:
        """A plain copy of the model with LoRA folded into the weights (for saving a final model)."""
        out = ShapesFlowModel(self.cfg, copy.deepcopy(self.transformer), copy.deepcopy(self.vae))
        out.text_encoder.load_state_dict(self.text_encoder.state_dict())
        if getattr(self, "_lora", False):
            out.transformer.fuse_lora()
            out.transformer.unload_lora()
        return out.requires_grad_(False).eval()

    def save_lora(self, path: str | Path) -> Path:
        """The transformer's adapter in diffusers' SD3 LoRA format (path/pytorch_lora_weights.safetensors)."""
        from diffusers.loaders import SD3LoraLoaderMixin

        from tempflow.models.lora import save_transformer_lora

        if not getattr(self, "_lora", False):
            raise ValueError("this model has no LoRA adapter (full fine-tuning): save it whole with save()")
        return save_transformer_lora(self.transformer, path, SD3LoraLoaderMixin)

    def save_trained(self, path: str | Path) -> None:
        """The fine-tuned model with LoRA merged (a model folder), and with LoRA the adapter in path/lora/."""
        from tempflow.models.lora import LORA_DIR

        self.merged().save(path)
        if getattr(self, "_lora", False):
            self.save_lora(Path(path) / LORA_DIR)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        self.check_finite(f"model not written to {str(path)!r}")
        path.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(path / "transformer", safe_serialization=True)
        if self.vae is not None:
            self.vae.save_pretrained(path / "vae", safe_serialization=True)
        (path / "text_encoder").mkdir(exist_ok=True)
        write_json(path / "text_encoder" / "config.json", self.text_encoder.config_dict())
        state = {k: v.detach().contiguous().cpu() for k, v in self.text_encoder.state_dict().items()}
        save_file(state, str(path / "text_encoder" / "model.safetensors"))
        (path / "tokenizer").mkdir(exist_ok=True)
        write_json(path / "tokenizer" / "vocab.json", self.tokenizer.vocab)
        write_json(path / "model_index.json", {"_class_name": CLASS_NAME, **asdict(self.cfg)})

    @classmethod
    def load(cls, path: str | Path) -> ShapesFlowModel:
        path = Path(path)
        index = read_json(path / "model_index.json")
        cfg = ShapesModelConfig(**{k: v for k, v in index.items() if not k.startswith("_")})
        transformer = SD3Transformer2DModel.from_pretrained(path / "transformer")
        vae = AutoencoderKL.from_pretrained(path / "vae") if cfg.latent_channels else None
        model = cls(cfg, transformer, vae)
        if read_json(path / "tokenizer" / "vocab.json") != model.tokenizer.vocab:
            raise ValueError("the tokenizer vocabulary does not match this version's grammar")
        model.text_encoder.load_state_dict(load_file(str(path / "text_encoder" / "model.safetensors")))
        return model.eval()
