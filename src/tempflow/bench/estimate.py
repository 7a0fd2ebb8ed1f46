"""`tempflow bench system --estimate`: a config's per-process peak memory at real sizes, from shapes alone.

Nothing is downloaded and no weight is allocated: the model's sizes come from its configuration built
on the meta device (model_sizes); the rest follows from the training config and the number of
processes. Per process, in bytes:

- model weights: the transformer, the text encoders and the VAE, on the device or (offload) in host
  memory, where the text encoders come to the device only to encode and the VAE only to decode;
- trained state: the trained weights (LoRA: float32), AdamW's two moments, the EMA, guard.rollback's
  copy of the weights and moments, the old policy (nft, tempflow_nft) or anchor (awm), the frozen
  reference of full fine-tuning; the gradient during the update;
- conditioning: the trainer's prompt cache (at most COND_CACHE_BYTES) and the iteration's rows;
- the rollout's held tensors, field by field as the algorithm's batch holds them (`rollout_tensors`),
  and its transients (the SDE step, the completion's and sampling's model calls, decoding);
- the update's activations, under gradient checkpointing or not, for the largest training forward
  (a whole global minibatch on one process: the worst case of the shuffled rows).

The peak is the largest of three phases: encoding prompts, the rollout, the update. Weights, trained
state, conditioning and the rollout's held tensors are counted exactly (a test compares the held
tensors with a real rollout's); activations and transients are estimates from a count of live tensors
per row (the *_TENSORS constants). CUDA's context and the allocator's slack come on top (2-4 GB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from tempflow.bench.model_sizes import FLOAT, ModelSizes, model_sizes
from tempflow.errors import ConfigError
from tempflow.training.config import TrainConfig

GB = 1e9
INDEX = 8  # int64 bytes: the batch's row and image indices
# live tensors of (tokens x hidden) per row, in the activations' dtype
BLOCK_TENSORS = 32  # one transformer block's saved activations in training (LoRA's float32 input copies included)
INFERENCE_TENSORS = 8  # a forward without gradient: the residual streams and one block's intermediates
VAE_TENSORS = 3  # the decoder's largest activation, live at once per image
DECODE_COPIES = 3  # decoded images of one VAE call on the device: the call's output, x + 1 and the clamp
SDE_COPIES = 7  # children's rows at one branch point: x and v repeated, the sample, the mean, temporaries
SOLVER_COPIES = 4  # latents per unit of a deterministic solver: x, v and DPM-Solver's two previous outputs
PHASE_NAMES = ("encode", "rollout", "update")


# ---- the rollout's held tensors ----------------------------------------------------------------------


def units_per_process(cfg: TrainConfig, processes: int) -> int:
    """The largest share of the iteration's units (prompts x seeds) among `processes`
    (tempflow.training.distributed.unit_range)."""
    from tempflow.training.distributed import unit_range

    n = cfg.rollout.prompts_per_iter * cfg.rollout.seeds_per_prompt
    return max(hi - lo for lo, hi in (unit_range(n, processes, r) for r in range(processes)))


def branch_points(cfg: TrainConfig) -> int:
    """Branch points per iteration of a branching algorithm."""
    a = cfg.algorithm
    return a.branch_sample or len(a.candidate_steps(cfg.rollout.num_steps))


def rollout_tensors(cfg: TrainConfig, latent: tuple[int, ...], image: tuple[int, ...], units: int
                    ) -> dict[str, tuple[int, str]]:
    """{field: (bytes, "device" | "host")} of what the algorithm's rollout batch holds for `units` units
    with samples of shape `latent` and images of shape `image`: the same fields, storages counted
    once, that `batch_bytes` measures on a real batch. A shared field (SharedRows) is its values and,
    under "<field>.index", its index."""
    a, u, T = cfg.algorithm, units, cfg.rollout.num_steps
    L, img = FLOAT * math.prod(latent), FLOAT * math.prod(image)
    if a.name == "flow_grpo":
        k = T - 1 if a.window == "all" else a.window_size
        n = u * k
        out = {"images": (u * img, "host"), **_image_keys(u)}
        out.update({"row_image": (n * INDEX, "host"), "x": (n * L, "device"), "x_next": (n * L, "device"),
                    "step": (n * INDEX, "host"), "log_prob_old": (n * FLOAT, "device")})
        if a.ratio == "guard":
            out["mean_old"] = (n * L, "device")
        out.update({"prompt_index": (n * INDEX, "host"), "seed_index": (n * INDEX, "host")})
        return out
    if a.name in ("tempflow_grpo", "tempflow_nft"):
        s = u * branch_points(cfg)
        n = s * a.children
        out = {"images": (n * img, "host"), **_image_keys(n)}
        if a.name == "tempflow_grpo":
            out.update({"row_image": (n * INDEX, "host"), "x": (s * L, "device"), "x.index": (n * INDEX, "host"),
                        "x_next": (n * L, "device"), "step": (n * INDEX, "host"),
                        "log_prob_old": (n * FLOAT, "device")})
            if a.ratio == "guard":
                out["mean_old"] = (s * L, "device")  # its index is x's
            out.update({"prompt_index": (n * INDEX, "host"), "seed_index": (n * INDEX, "host")})
            return out
        r = n * a.draws
        out.update({"row_image": (r * INDEX, "host"), "x0": (n * L, "device"), **_row_draws(r),
                    "image_state": (n * INDEX, "host"), "state_x": (s * L, "device"),
                    "state_step": (s * INDEX, "host")})
        return out
    if a.name in ("nft", "awm"):
        r = u * a.timesteps
        return {"images": (u * img, "host"), **_image_keys(u), "row_image": (r * INDEX, "host"),
                "x0": (u * L, "device"), **_row_draws(r)}
    raise ConfigError(f"the memory estimate does not know algorithm {a.name!r}")


def _image_keys(images: int) -> dict[str, tuple[int, str]]:
    return {k: (images * INDEX, "host") for k in ("image_prompt", "image_seed", "image_step")}


def _row_draws(rows: int) -> dict[str, tuple[int, str]]:
    return {"row_t": (rows * FLOAT, "host"), "row_noise": (rows * INDEX, "host"), "row_draw": (rows * INDEX, "host")}


def batch_bytes(batch: Any) -> dict[str, int]:
    """{field: bytes} a rollout batch holds, measured: each tensor's storage, counted once (in field
    order), a SharedRows field as its values and "<field>.index"."""
    from tempflow.algorithms.base import SharedRows

    seen: set[tuple[str, int]] = set()
    out: dict[str, int] = {}

    def add(name: str, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            out[name] = out.get(name, 0) + storage.nbytes()

    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, SharedRows):
            add(f.name, value.values)
            add(f"{f.name}.index", value.index)
        elif isinstance(value, torch.Tensor):
            add(f.name, value)
    return out


# ---- phases and the estimate ---------------------------------------------------------------------------


@dataclass
class Estimate:
    """One config on `processes` processes: bytes per item (per process) and the phases' device peaks."""

    config: str
    processes: int
    units: int  # this process's units (the largest share)
    items: dict[str, int]  # see ITEMS
    phases: dict[str, int]  # device bytes at the peak of each phase
    host: int  # host memory the run holds beyond the device's (offloaded weights, images, indices)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "processes": self.processes, "units_per_process": self.units,
                "bytes": dict(self.items), "phases": dict(self.phases), "peak_bytes": self.peak,
                "host_bytes": self.host}


ITEMS = {  # item -> label of the table
    "transformer": "transformer weights",
    "text_encoders": "text encoders (on the device)",
    "vae": "VAE (on the device)",
    "offloaded": "text encoders + VAE in host memory (offload)",
    "trained": "trained weights + AdamW + EMA",
    "rollback": "guard.rollback copy (weights + AdamW)",
    "algorithm_copy": "old policy / anchor / frozen reference",
    "gradient": "gradient (update)",
    "conditioning": "conditioning (cache + iteration)",
    "rollout_held": "rollout: held on the device",
    "rollout_transient": "rollout: transient on the device",
    "rollout_host": "rollout: images + indices in host memory",
    "activations": "update: activations",
    "update_transient": "update: reference / old-policy forward",
}


def _inference_bytes(sizes: ModelSizes, rows: int) -> int:
    """A forward without gradient of `rows` transformer rows (guidance already counted in rows)."""
    seq = sizes.image_tokens + sizes.text_tokens
    return INFERENCE_TENSORS * rows * seq * sizes.hidden * sizes.act_bytes


def _call_bytes(sizes: ModelSizes, cfg: TrainConfig, guidance: float) -> int:
    """One sampling call of max_batch rows: the inputs in the weights' dtype, the rows' conditioning (and
    the doubled batch's copy with guidance), the forward and the float32 velocity."""
    b = cfg.rollout.max_batch
    rows = b * sizes.forwards_per_row(guidance)
    cond = (b + (rows if rows > b else 0)) * sizes.cond_row_bytes  # the call's rows, and the doubled batch's
    return cond + rows * math.prod(sizes.latent) * sizes.weight_bytes + _inference_bytes(sizes, rows) \
        + b * sizes.latent_bytes


def _decode_bytes(sizes: ModelSizes, offload: bool) -> int:
    """One VAE call: its activations and output images (and the VAE itself when it waits on the host)."""
    b = sizes.decode_batch
    act = VAE_TENSORS * b * sizes.vae_peak * sizes.vae_act_bytes + DECODE_COPIES * b * sizes.image_bytes
    return act + (sizes.weights["vae"] if offload else 0)


def rollout_transient(cfg: TrainConfig, sizes: ModelSizes, units: int) -> int:
    """Device bytes the rollout holds at its peak beyond what its batch keeps: the children's SDE step,
    the completion's clean samples, the solver's state, model calls and one VAE call."""
    a, r, L = cfg.algorithm, cfg.rollout, sizes.latent_bytes
    call, decode = _call_bytes(sizes, cfg, r.guidance), _decode_bytes(sizes, cfg.model_options.offload)
    if a.name in ("tempflow_grpo", "tempflow_nft"):
        n = units * branch_points(cfg) * a.children
        branching = SDE_COPIES * units * a.children * L + 2 * units * L + call  # at a branch point
        finishing = n * L + max(call, decode)  # the completed children, or (tempflow_nft) x_next beside them
        unkept = n * FLOAT if a.name == "tempflow_nft" else 0  # log-probabilities its batch does not keep
        return max(branching, finishing) + unkept + _holding(cfg, sizes, "rollout")
    sampling = SOLVER_COPIES * units * L + call
    if a.name == "flow_grpo":  # the trajectory's states sit in lists until they are stacked into the batch
        k = r.num_steps - 1 if a.window == "all" else a.window_size
        lists = (k + 1 + (k if a.ratio == "guard" else 0)) * units * L
        held = sum(b for b, where in rollout_tensors(cfg, sizes.latent, sizes.image, units).values()
                   if where == "device")  # stacked last: absent while sampling and decoding
        return lists + max(0, max(sampling, decode) - held)
    return max(sampling, decode) + _holding(cfg, sizes, "rollout")


def _holding(cfg: TrainConfig, sizes: ModelSizes, phase: str) -> int:
    """Policy.holding's backup of the trained weights while an old policy or anchor computes."""
    a = cfg.algorithm
    holds = {"rollout": ("nft", "tempflow_nft"),
             "update": ("nft", "tempflow_nft") + (("awm",) if getattr(a, "anchor_beta", 0) > 0 else ())}
    if a.name == "tempflow_nft" and a.objective == "anchored":
        holds["update"] = ()  # no old velocity without the local term
    return FLOAT * sizes.trained_params if a.name in holds[phase] else 0


def training_rows(cfg: TrainConfig, sizes: ModelSizes) -> tuple[int, int]:
    """(rows of the largest training forward, transformer rows of it): a whole global minibatch on one
    process; branching algorithms run one row per state of its rows (rows of a state stay together)."""
    a, mb = cfg.algorithm, cfg.optim.minibatch
    if a.name == "tempflow_grpo":
        rows = min(mb, 1 + math.ceil((mb - 1) / a.children))
        return rows, rows * sizes.forwards_per_row(cfg.rollout.guidance)
    if a.name == "flow_grpo":
        return mb, mb * sizes.forwards_per_row(cfg.rollout.guidance)
    rows = mb
    if a.name == "tempflow_nft":
        states = min(mb, 1 + math.ceil((mb - 1) / a.children))
        rows = {"local": mb, "anchored": states, "both": mb + states}[a.objective]
    return rows, rows * sizes.forwards_per_row(a.train_guidance)


def activation_bytes(cfg: TrainConfig, sizes: ModelSizes) -> int:
    """The largest training forward's activations kept for its backward: with gradient checkpointing
    each block's input plus one block's activations while it is recomputed; without, every block's."""
    _, rows = training_rows(cfg, sizes)
    unit = rows * (sizes.image_tokens + sizes.text_tokens) * sizes.hidden * sizes.act_bytes
    if cfg.model_options.gradient_checkpointing:
        return (sizes.blocks + BLOCK_TENSORS) * unit
    return sizes.blocks * BLOCK_TENSORS * unit


def estimate(cfg: TrainConfig, processes: int = 1, name: str = "") -> Estimate:
    """The per-process memory of `cfg` on `processes` processes."""
    from tempflow.training.loop import COND_CACHE_BYTES

    units = cfg.rollout.prompts_per_iter * cfg.rollout.seeds_per_prompt
    if not 1 <= processes <= units:
        raise ConfigError(f"{processes} processes cannot share {units} units (prompts_per_iter x seeds_per_prompt)")
    sizes, o = model_sizes(cfg), cfg.model_options
    u = units_per_process(cfg, processes)
    held = rollout_tensors(cfg, sizes.latent, sizes.image, u)
    p, lora = sizes.trained_params, cfg.lora.enabled
    text = sum(v for k, v in sizes.weights.items() if k.startswith("text_encoder"))
    old = FLOAT * p if cfg.algorithm.name in ("nft", "awm", "tempflow_nft") else 0  # old policy or anchor
    rows, forward_rows = training_rows(cfg, sizes)
    reference = _inference_bytes(sizes, forward_rows) if getattr(cfg.algorithm, "kl_beta", 0) > 0 else 0
    items = {
        "transformer": sizes.weights["transformer"],
        "text_encoders": 0 if o.offload else text,
        "vae": 0 if o.offload else sizes.weights["vae"],
        "offloaded": text + sizes.weights["vae"] if o.offload else 0,
        "trained": p * (FLOAT * 3 + (FLOAT if lora else 0)),  # weights (LoRA), two moments, EMA
        "rollback": 3 * FLOAT * p if cfg.guard.rollback else 0,
        "algorithm_copy": old + (0 if lora else sizes.weights["transformer"]),  # + full fine-tuning's reference
        "gradient": FLOAT * p * (2 if processes > 1 else 1),  # with several processes DDP's buckets too
        "conditioning": COND_CACHE_BYTES + cfg.rollout.prompts_per_iter * sizes.cond_row_bytes,
        "rollout_held": sum(b for b, where in held.values() if where == "device"),
        "rollout_transient": rollout_transient(cfg, sizes, u),
        "rollout_host": sum(b for b, where in held.values() if where == "host"),
        "activations": activation_bytes(cfg, sizes),
        "update_transient": (rows + forward_rows) * sizes.cond_row_bytes + reference,
    }
    base = sum(items[k] for k in ("transformer", "text_encoders", "vae", "trained", "rollback", "algorithm_copy",
                                  "conditioning"))
    old_forward = _holding(cfg, sizes, "update") + _inference_bytes(sizes, forward_rows)  # before the trained one
    phases = {
        "encode": base + (text if o.offload else 0),
        "rollout": base + items["rollout_held"] + items["rollout_transient"],
        "update": base + items["gradient"] + items["rollout_held"]
        + max(items["activations"] + items["update_transient"], old_forward),
    }
    return Estimate(name or cfg.model, processes, u, items, phases, items["offloaded"] + items["rollout_host"])


# ---- output ----------------------------------------------------------------------------------------------


def _gb(x: int) -> str:
    return f"{x / GB:.1f}"


def estimate_table(est: Estimate) -> str:
    """One estimate as text: every item, the phases and the peak, in GB (1e9 bytes)."""
    lines = [f"{est.config}: {est.processes} process(es), {est.units} units on this one; estimated GB per process"]
    for key, label in ITEMS.items():
        lines.append(f"  {label:<46}{_gb(est.items[key]):>8}")
    for phase in PHASE_NAMES:
        lines.append(f"  {'peak on the device while: ' + phase:<46}{_gb(est.phases[phase]):>8}")
    lines.append(f"  {'peak on the device':<46}{_gb(est.peak):>8}")
    lines.append(f"  {'host memory (offloaded weights, rollout)':<46}{_gb(est.host):>8}")
    return "\n".join(lines)


MARKDOWN_COLUMNS = (  # (header, value of an estimate)
    ("weights", lambda e: e.items["transformer"] + e.items["text_encoders"] + e.items["vae"]),
    ("trained state", lambda e: sum(e.items[k] for k in ("trained", "rollback", "algorithm_copy", "gradient"))),
    ("conditioning", lambda e: e.items["conditioning"]),
    ("rollout held", lambda e: e.items["rollout_held"]),
    ("rollout transient", lambda e: e.items["rollout_transient"]),
    ("update activations", lambda e: e.items["activations"] + e.items["update_transient"]),
    ("**peak (phase)**", None),
    ("host: offloaded + images", lambda e: e.host),
)


def markdown_table(estimates: list[Estimate]) -> str:
    """A markdown table, one line per estimate (GB per process)."""
    head = ["preset", "processes", *[h for h, _ in MARKDOWN_COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in estimates:
        phase = max(e.phases, key=lambda k: e.phases[k])
        cells = [f"`{e.config}`", str(e.processes)]
        cells += [f"**{_gb(e.peak)}** ({phase})" if fn is None else _gb(fn(e)) for _, fn in MARKDOWN_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
