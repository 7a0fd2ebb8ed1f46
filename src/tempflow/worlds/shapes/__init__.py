"""The shapes world: procedural scenes of coloured shapes, captions in six GenEval categories, a
verifier, the built-in model ``shapes-base`` and its pretraining.

`ShapesWorld` hands these pieces to the core through the `tempflow.worlds.World` protocol; the
modules beside it hold them: ``grammar`` (prompts and categories), ``prompts`` (the shipped sets),
``scenes`` (drawing a scene for a caption), ``verifier`` (reading a scene back), ``reward``, ``model``
and ``text`` (the built-in model) and ``pretrain``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tempflow.errors import ModelLoadError, PromptError
from tempflow.rewards import lazy_reward
from tempflow.worlds import Verdict, World
from tempflow.worlds.shapes.grammar import CATEGORIES, parse_prompt

if TYPE_CHECKING:
    import torch

    from tempflow.models.base import FlowModel, ModelOptions

IMAGE_SIZE = 64  # drawn at 32x32 (64x64 works the same); the verifier reads every pixel
_PACKAGE = "tempflow.worlds.shapes"


def load_shapes_model(name_or_path: str, options: ModelOptions) -> FlowModel:
    """The built-in model from its folder; options that its checkpoint fixes are refused in one line."""
    from tempflow.worlds.shapes.model import ShapesFlowModel

    unsupported = {"dtype": options.dtype not in ("auto", "fp32"), "resolution": options.resolution != 0,
                   "offload": options.offload, "max_sequence_length": options.max_sequence_length != 0}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ModelLoadError(f"model_options.{bad[0]} does not apply to the shapes model (its size and precision "
                             "are fixed by its checkpoint); leave it at its default")
    model = ShapesFlowModel.load(name_or_path)
    if options.gradient_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    return model.to(options.torch_device())


class ShapesWorld(World):
    name = "shapes"
    categories = CATEGORIES

    @property
    def failure_kinds(self) -> tuple[str, ...]:  # type: ignore[override]
        from tempflow.worlds.shapes.verifier import FAILURES

        return FAILURES

    def prompt_sets(self) -> dict[str, Path]:
        data = resources.files(_PACKAGE) / "data"
        return {"shapes-train": Path(str(data / "train.txt")), "shapes-eval": Path(str(data / "eval.txt"))}

    def category(self, prompt: str) -> str | None:
        try:
            return parse_prompt(prompt).category
        except PromptError:
            return None

    def judge(self, images: torch.Tensor, prompts: list[str]) -> Verdict:
        from tempflow.worlds.shapes.verifier import detect, failure, score_detections

        specs = [parse_prompt(p) for p in prompts]
        dets = detect(images)
        frac, strict = score_detections(dets, specs)
        return Verdict(frac, strict, [failure(d, s) for d, s in zip(dets, specs)])

    def models(self) -> dict[str, Path]:
        return {"shapes-base": Path(str(resources.files(_PACKAGE) / "base"))}

    def model_loaders(self) -> dict[str, Callable[[str, ModelOptions], FlowModel]]:
        return {"ShapesFlowModel": load_shapes_model}

    def rewards(self) -> dict[str, Callable[..., Any]]:
        module = f"{_PACKAGE}.reward"
        return {
            "shapes": lazy_reward("shapes", module, "make_shapes_reward", IMAGE_SIZE),
            "shapes_strict": lazy_reward("shapes_strict", module, "make_shapes_strict_reward", IMAGE_SIZE),
            "shapes_graded": lazy_reward("shapes_graded", module, "make_shapes_graded_reward", IMAGE_SIZE),
        }

    def pretrain(self, config: str | None, overrides: list[str], out: str) -> Path:
        from tempflow.config import load_config
        from tempflow.worlds.shapes.pretrain import PretrainConfig, pretrain

        return pretrain(load_config(PretrainConfig, config or "configs/shapes/pretrain.yaml", overrides), out)


WORLD = ShapesWorld()
