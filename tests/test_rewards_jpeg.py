import io
import math

import pytest
import torch
from PIL import Image

from tempflow.errors import TempflowError
from tempflow.rewards import make_reward
from tempflow.rewards.jpeg import jpeg_size_kb


def images() -> torch.Tensor:
    """A flat image, a smooth gradient and uniform noise, (3, 3, 64, 64)."""
    g = torch.Generator().manual_seed(0)
    flat = torch.full((3, 64, 64), 0.4)
    ramp = torch.linspace(0, 1, 64).view(1, 1, 64).expand(3, 64, 64)
    return torch.stack([flat, ramp, torch.rand(3, 64, 64, generator=g)])


def test_flat_images_compress_better_than_noise():
    prompts = ["x"] * 3
    incompressibility = make_reward("jpeg_incompressibility")(images(), prompts, None)
    compressibility = make_reward("jpeg_compressibility")(images(), prompts, None)
    assert incompressibility.shape == (3,) and incompressibility.dtype == torch.float32
    assert incompressibility[0] < incompressibility[1] < incompressibility[2]
    assert torch.equal(compressibility, -incompressibility)


def test_size_is_the_pillow_jpeg_size_in_kb():
    x = images()[2]
    buffer = io.BytesIO()
    Image.fromarray((x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=95)
    assert jpeg_size_kb(x[None]).item() == torch.tensor(buffer.tell() / 1000).item()
    assert jpeg_size_kb(x[None], quality=50) < jpeg_size_kb(x[None])


def test_a_broken_image_scores_nan_and_the_others_do_not():
    x = images()
    x[1, 0, 3, 3] = float("nan")
    scores = make_reward("jpeg_compressibility")(x, ["x"] * 3, None)
    assert math.isnan(scores[1]) and torch.isfinite(scores[[0, 2]]).all()


def test_quality_is_checked_when_the_reward_is_built():
    with pytest.raises(TempflowError, match="quality must be an integer from 1 to 100"):
        make_reward("jpeg_compressibility(quality=high)")


def test_combined_jpeg_rewards_log_each_raw_score():
    meta = [{} for _ in range(3)]
    scores = make_reward("jpeg_compressibility:0.5,jpeg_incompressibility(quality=80):2")(images(), ["x"] * 3, meta)
    raw = jpeg_size_kb(images())
    assert torch.allclose(scores, -0.5 * raw + 2 * jpeg_size_kb(images(), quality=80))
    assert meta[2]["rewards"]["jpeg_compressibility"] == -raw[2].item()
    assert set(meta[0]["rewards"]) == {"jpeg_compressibility", "jpeg_incompressibility"}
