"""What every rollout shares: per-unit random draws, decoding to the host, and the order of the update's
rows.

Every random draw of a unit comes from its own seed (`unit_noise`), never from a generator shared by
the batch: a unit's draws are the same whichever process, and whichever batch, computes them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

PHASES = ("main_s", "branch_s", "decode_s")  # rollout time: main path, branches (SDE + completion), decoding
DECODE_CHUNK = 256  # latents per decode call for a model whose decode has no batch of its own

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that scatters nearby inputs."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def _mixed(seed: int, tag: int) -> int:
    """A 64-bit number scattered from a unit seed and a tag (a grid step, or what a draw is for)."""
    return _mix64((int(seed) + _mix64(tag + 1)) & _MASK64)


def unit_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded by (unit seed, step) alone."""
    return torch.Generator().manual_seed(_mixed(seed, step))


def unit_noise(seeds: list[int], step: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(len(seeds) * count, *shape) standard normal noise, unit-major: the `count` draws of each unit
    at grid step `step` come from a generator seeded by (unit seed, step) alone, so they do not depend
    on which other units share the batch or the process."""
    return torch.cat([torch.randn((count, *shape), generator=unit_generator(s, step)) for s in seeds])


def decode_batch(model: Any) -> int:
    """Latents per VAE call of `model.decode`: the default of its `batch` argument (the diffusers
    pipelines 8, the shapes model 256), else DECODE_CHUNK."""
    batch = inspect.signature(model.decode).parameters.get("batch")
    return batch.default if batch is not None and isinstance(batch.default, int) else DECODE_CHUNK


@torch.no_grad()
def decode_to_host(model: Any, x: torch.Tensor) -> torch.Tensor:
    """model.decode(x) as float32 images on the CPU, decoded in the model's own batches (`decode_batch`,
    so that the images are those of one decode call, bit for bit): the accelerator holds one batch of
    images, never all of a rollout's. Rewards take float images in [0, 1] (a NaN pixel scores NaN), so
    they stay float32: uint8 would change what a reward sees."""
    chunk = decode_batch(model)
    if len(x) <= chunk:
        return model.decode(x).float().cpu()
    out = None
    for i in range(0, len(x), chunk):
        images = model.decode(x[i:i + chunk]).float()
        if out is None:  # all images on the host, filled batch by batch, in the layout one call returns
            out = torch.empty((len(x), *images.shape[1:]), dtype=torch.float32, memory_format=_layout(images))
        out[i:i + len(images)] = images.cpu()
    return out


def _layout(images: torch.Tensor) -> torch.memory_format:
    """The memory format of a decoded batch (a VAE on the CPU may return channels-last images): a reward's
    reductions over pixels follow the layout, so the images keep it."""
    channels_last = images.dim() == 4 and not images.is_contiguous() and images.is_contiguous(
        memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def first_rows(ids: torch.Tensor) -> torch.Tensor:
    """(S,) the first row of each of the dense ids 0..S-1 (`advantages.group_ids`), in id order."""
    rows = torch.arange(len(ids))
    return torch.full((int(ids.max()) + 1,), len(ids)).scatter_reduce(0, ids, rows, "amin")


def state_order(ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random order of the rows that keeps the rows of one state together: the states are
    shuffled, and each keeps its rows in their order. With one row per state (Flow-GRPO) it is the
    plain row permutation `torch.randperm(len(ids), generator=generator)` draws."""
    perm = torch.randperm(int(ids.max()) + 1, generator=generator)  # perm[k]: the k-th state
    position = torch.empty_like(perm)
    position[perm] = torch.arange(len(perm))
    return torch.argsort(position[ids] * len(ids) + torch.arange(len(ids)))


def mixed_seed(seed: int, tag: int) -> int:
    """A 63-bit seed from a unit seed and a tag (what the draw is for): distinct tags, unrelated draws."""
    return _mixed(seed, tag) >> 1


def seeded_noise(seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(len(seeds), *shape) standard normal noise, row i from a generator seeded by seeds[i] alone."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
