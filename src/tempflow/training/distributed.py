"""The processes of one run: accelerate's process group, the rule that shares work between ranks,
and the few collectives the trainer needs.

A run launched with `accelerate launch` or `torchrun` (one or several nodes) has W processes; a
plain `tempflow train` has one, and every collective below is then the identity, so the single
process and the distributed run go through the same code.

Sharing rule: n units (TempFlow: (prompt, seed); Flow-GRPO: (prompt, trajectory)), numbered
prompt-major, are cut into W contiguous chunks whose sizes differ by at most one: rank r takes
units [r * n // W, (r + 1) * n // W). A group (the units of one prompt) may span two ranks; the
group statistics are computed after gathering, so they do not depend on where a group lands.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch

from tempflow.errors import TempflowError

WAIT_MINUTES = 60  # longest a collective waits for a process (the main one writing a checkpoint, say)
# accelerate's distributed types that keep every weight and the whole optimizer state on every
# process, which rollouts, the EMA and the checkpoints rely on
SUPPORTED = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA", "MULTI_HPU")


def unit_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """The units [lo, hi) of rank `rank` out of n shared by `world` processes (balanced, contiguous)."""
    return rank * n // world, (rank + 1) * n // world


class Dist:
    """accelerate's Accelerator plus gathers of unequal length, sums and barriers, on CPU tensors."""

    def __init__(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        # mixed precision stays the trainer's (optim.mixed_precision): sampling and training must
        # run the same arithmetic, and rollouts call the model outside accelerate's wrapper. The
        # trainer places the model itself (model_options.device alone, accelerate's device when
        # launched); without CUDA the processes talk over gloo on the CPU. The others may wait for
        # the main process while it writes a large checkpoint or the final model: a long timeout.
        wait = InitProcessGroupKwargs(timeout=timedelta(minutes=WAIT_MINUTES))
        self.acc = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available(), device_placement=False,
                               kwargs_handlers=[wait])
        if self.kind not in SUPPORTED:
            raise TempflowError(
                f"the launch configuration asks accelerate for {self.kind}, which shards weights or optimizer "
                "state between processes; tempflow train needs them whole on every process (rollouts, EMA, "
                "checkpoints): launch with configs/accelerate/ddp.yaml, or torchrun, instead")

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def kind(self) -> str:
        """accelerate's distributed type: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED, ..."""
        return str(self.acc.distributed_type).split(".")[-1]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of every rank, concatenated in rank order (counts may differ); on CPU."""
        return self.gather_counts(t)[0]

    def gather_counts(self, t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(rows of every rank in rank order, the number of rows each rank gave)."""
        if self.world == 1:
            return t.cpu(), [t.shape[0]]
        dev = self.device
        counts = [int(c) for c in self.acc.gather(torch.tensor([t.shape[0]], device=dev)).tolist()]
        dtype = t.dtype
        x = t.to(dev, torch.uint8 if dtype == torch.bool else dtype)
        pad = torch.zeros((max(counts) - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=dev)
        full = self.acc.gather(torch.cat([x, pad])).cpu()  # (W * max, ...)
        parts = [full[i * max(counts) : i * max(counts) + c] for i, c in enumerate(counts)]
        return torch.cat(parts).to(dtype), counts

    def gather_objects(self, obj: Any) -> list[Any]:
        """One picklable object per rank, in rank order."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (CPU in, CPU out)."""
        if self.world == 1:
            return t
        return self.acc.reduce(t.to(self.device), reduction="sum").cpu()

    def max(self, value: float) -> float:
        """The largest of the ranks' values (so that decisions such as stopping are the same everywhere)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.acc.gather(t).max())

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def close(self) -> None:
        """Leave the process group cleanly, everyone having reached the end before anyone tears it down
        (left to interpreter shutdown, gloo may abort the process and turn a finished run into a failure)."""
        if self.world == 1:
            return
        self.acc.wait_for_everyone()
        self.acc.end_training()  # destroys the process group


class PolicyModule(torch.nn.Module):
    """What accelerate wraps (DDP, FSDP, DeepSpeed): the model's guided velocity. The training forward
    passes go through the wrapper, so that its gradient hooks average the gradients over processes;
    rollouts, the reference policy and evaluation call the model itself (no gradient, no collective)."""

    def __init__(self, model: Any, params: list[torch.nn.Parameter]) -> None:
        super().__init__()
        if isinstance(model, torch.nn.Module):
            self.flow = model
        else:  # a model that is not a module itself: its trained parameters are this module's
            self.trained = torch.nn.ParameterList(params)
        self._velocity = model.velocity

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor,
                guidance: float) -> torch.Tensor:
        from tempflow.models.base import Conditioning

        return self._velocity(x, t, Conditioning(tokens, pooled), guidance)


def rank_rng_state(gen: torch.Generator, shuffle_gen: torch.Generator, rng_state: list) -> dict:
    """One process's random states (its generators, Python's and torch's global one) for a checkpoint."""
    return {"gen": gen.get_state().clone(), "shuffle": shuffle_gen.get_state().clone(),
            "torch": torch.get_rng_state().clone(), "python": rng_state}
