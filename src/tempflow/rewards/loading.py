"""Shared plumbing of the model-based rewards: optional imports, weight files, devices, batching.

Nothing here imports an optional package at module level; ``require`` does it on demand and turns a
missing package into a one-line TempflowError that says what to install.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from tempflow.errors import TempflowError

INSTALL_HINT = "pip install tempflow[rewards]"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def require(module: str, reward: str) -> ModuleType:
    """Import an optional dependency of a reward, or fail with the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TempflowError(f"reward {reward!r} needs the package {module!r} ({e}); install it with: "
                            f"{INSTALL_HINT}") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None picks the GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise TempflowError(f"unknown reward dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_file(source: str, filename: str, reward: str) -> Path:
    """A local file, a file inside a local folder, or ``filename`` downloaded from the hub repo ``source``."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / filename).is_file():
            raise TempflowError(f"reward {reward!r}: folder {str(path)!r} has no {filename!r}; "
                                "pass the weight file itself or a folder that holds it")
        return path / filename
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise TempflowError(f"reward {reward!r}: {source!r} is neither a local file or folder nor a hub repo id")
    hub = require("huggingface_hub", reward)
    try:
        return Path(hub.hf_hub_download(source, filename))
    except Exception as e:  # network, authentication and missing-file errors all mean the same to the user
        raise TempflowError(f"reward {reward!r}: {source!r} is not a local file or folder, and fetching "
                            f"{filename!r} from the hub repo of that name failed ({type(e).__name__}); "
                            "check the path") from None


def load_state_dict_file(path: str | Path, reward: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or of a plain PyTorch checkpoint, never unpickling code.

    A checkpoint that wraps its tensors as ``{"state_dict": {...}}`` is unwrapped, and a ``module.``
    prefix left by DistributedDataParallel is removed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path))
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise TempflowError(f"reward {reward!r}: {str(path)!r} is not a plain tensor checkpoint "
                                f"({type(e).__name__}); convert it to .safetensors") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TempflowError(f"reward {reward!r}: {str(path)!r} does not hold a dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_pretrained(load: Callable[[], Any], what: str, source: str, reward: str) -> Any:
    """Call a transformers ``from_pretrained`` and turn its failures into one readable line."""
    try:
        return load()
    except (OSError, ValueError) as e:
        raise TempflowError(f"reward {reward!r}: cannot load the {what} from {source!r}: {one_line(e)}") from None


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, shortened."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def batched(fn: Callable[[slice], torch.Tensor], n: int, batch_size: int) -> torch.Tensor:
    """Concatenate fn(slice) over consecutive slices of at most batch_size rows."""
    if batch_size < 1:
        raise TempflowError(f"reward batch_size must be >= 1, got {batch_size}")
    return torch.cat([fn(slice(i, min(i + batch_size, n))) for i in range(0, n, batch_size)])


def check_images(images: torch.Tensor, prompts: list[str], reward: str) -> None:
    """Images must be (B, 3, H, W) with one prompt each."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise TempflowError(f"reward {reward!r} expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise TempflowError(f"reward {reward!r} got {images.shape[0]} images but {len(prompts)} prompts")


def build_with_weights(make: Callable[[], torch.nn.Module], sd: dict[str, torch.Tensor],
                       reward: str) -> torch.nn.Module:
    """Construct ``make()`` without initialising its weights, then load exactly ``sd`` into it.

    The module is built on the meta device (no random initialisation of a large model) and the
    tensors of ``sd`` are assigned; non-persistent ``position_ids`` buffers, which no checkpoint
    holds, are rebuilt. Missing, unexpected or mis-shaped tensors give one line naming the first few.
    """
    with torch.device("meta"):
        module = make()
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    shapes = sorted(k for k in set(want) & set(sd) if tuple(sd[k].shape) != want[k])
    for what, keys in (("missing", missing), ("unexpected", extra), ("wrongly shaped", shapes)):
        if keys:
            detail = ", ".join(f"{k} {tuple(sd[k].shape)} vs {want[k]}" if what == "wrongly shaped" else k
                               for k in keys[:3])
            raise TempflowError(f"reward {reward!r}: the weights do not fit the model: {len(keys)} {what} "
                                f"tensors ({detail}{', ...' if len(keys) > 3 else ''})")
    module.load_state_dict(sd, strict=True, assign=True)
    for sub in module.modules():
        for name, buf in list(sub.named_buffers(recurse=False)):
            if buf.is_meta and name == "position_ids":
                setattr(sub, name, torch.arange(buf.shape[-1]).expand(buf.shape))
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise TempflowError(f"reward {reward!r}: internal error, tensors left uninitialised: {', '.join(left[:3])}")
    return module
