import random

import pytest
import torch

from tempflow.worlds.shapes.model import ShapesFlowModel, ShapesModelConfig


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg() -> ShapesModelConfig:
    return ShapesModelConfig(image_size=16, patch_size=4, width=32, depth=1, heads=2, text_width=16, text_depth=1)


@pytest.fixture
def tiny_model(tiny_cfg: ShapesModelConfig) -> ShapesFlowModel:
    return ShapesFlowModel(tiny_cfg).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny randomly initialised shapes model saved as a model folder."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    cfg = ShapesModelConfig(image_size=16, patch_size=4, width=32, depth=1, heads=2, text_width=16, text_depth=1)
    ShapesFlowModel(cfg).save(path)
    return str(path)
