import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tempflow.errors import TempflowError
from tempflow.rewards import make_reward
from tempflow.rewards.mlp import RewardMLP
from tempflow.rewards.preprocess import ImageTransform, load_transform, transform_from_config
from test_rewards_tiny import image_processor, save_clip, save_processor, uint8_images

PROMPTS = ["a red cat", "a photo of a dog", "a red cat", "blue square"]


def reference_pixels(images: torch.Tensor, processor) -> torch.Tensor:
    """transformers' own preprocessing of the same images, given as uint8 arrays as from PIL."""
    arrays = [(im * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() for im in images]
    return processor(images=arrays, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("hw", [(32, 32), (300, 260), (64, 100), (500, 480), (17, 33), (224, 224)])
def test_preprocessing_matches_clip_image_processor(hw):
    images = uint8_images(2, *hw)
    processor = image_processor(224, 224)
    ours = ImageTransform()(images)
    ref = reference_pixels(images, processor)
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    diff = ((ours - ref) * std * 255).abs()  # in grey levels; the reference is rounded to whole levels
    assert diff.max() <= 1.5 and diff.mean() <= 0.4


def test_preprocessing_reads_the_processor_config(tmp_path):
    kw = dict(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    save_processor(tmp_path / "p", size=40, crop=36, **kw)
    transform = load_transform(str(tmp_path / "p"), "test")
    assert transform == ImageTransform(40, None, (36, 36), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic")
    images = uint8_images(3, 50, 70)
    ref = reference_pixels(images, image_processor(40, 36, **kw))
    ours = transform(images)
    assert ours.shape == ref.shape == (3, 3, 36, 36)
    assert ((ours - ref) * torch.tensor(kw["image_std"]).view(1, 3, 1, 1) * 255).abs().max() <= 1.5
    assert torch.equal(transform(images[1:2]), ours[1:2])  # per image, whatever the batch


def test_preprocessing_reads_the_older_config_layout(tmp_path):
    cfg = {"size": 224, "crop_size": 224, "resample": 3, "do_center_crop": True, "image_mean": [0.1, 0.2, 0.3]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    t = load_transform(str(tmp_path), "test")
    assert (t.shortest_edge, t.crop, t.mean) == (224, (224, 224), (0.1, 0.2, 0.3))
    assert transform_from_config({"size": {"height": 30, "width": 20}, "do_center_crop": False}).size == (30, 20)
    with pytest.raises(TempflowError, match="resample"):
        transform_from_config({"resample": 0})


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch.manual_seed(0)
    return save_clip(tmp_path_factory.mktemp("clip") / "clip")


def reference_cosine(model, path, images, prompts):
    """Cosine of transformers' own CLIP forward on its own preprocessing and tokenisation.

    At the model's input size (32x32) the reference preprocessing involves no rounding, so the
    rewards must agree to float precision; resizing is pinned by the preprocessing tests above.
    """
    assert images.shape[-2:] == (32, 32)
    from transformers import CLIPProcessor

    processor = CLIPProcessor.from_pretrained(path)
    tok = processor.tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt")
    pixels = reference_pixels(images, processor.image_processor)
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels)
    return F.cosine_similarity(out.image_embeds, out.text_embeds), out.image_embeds


def check_reward_fn(fn, images, prompts):
    """(B,) float32; a batch scores as its images one by one; the same call gives the same scores."""
    scores = fn(images, prompts, [{} for _ in prompts])
    assert scores.shape == (len(prompts),) and scores.dtype == torch.float32
    one_by_one = torch.cat([fn(images[i:i + 1], prompts[i:i + 1], [{}]) for i in range(len(prompts))])
    assert torch.allclose(scores, one_by_one, atol=1e-5, rtol=1e-5)
    assert torch.equal(fn(images, prompts, [{} for _ in prompts]), scores)
    return scores


def test_pickscore_is_scaled_clip_cosine(tiny_clip):
    path, model = tiny_clip
    reward = make_reward("pickscore", model=str(path), processor=str(path), device="cpu")
    check_reward_fn(reward, uint8_images(4, 40, 48), PROMPTS)  # resized and cropped on the way
    images = uint8_images(4, 32, 32)
    scores = check_reward_fn(reward, images, PROMPTS)
    cos, _ = reference_cosine(model, path, images, PROMPTS)
    assert torch.allclose(scores, model.logit_scale.exp() * cos, atol=1e-5)
    again = make_reward("pickscore", model=str(path), processor=str(path), device="cpu", scale=100.0)
    assert torch.allclose(again(images, PROMPTS, None), 100 * cos, atol=1e-4)


def test_clipscore_is_clipped_cosine(tiny_clip):
    path, model = tiny_clip
    images = uint8_images(4, 32, 32, seed=1)
    scores = check_reward_fn(make_reward("clipscore", model=str(path), device="cpu", batch_size=3), images, PROMPTS)
    cos, _ = reference_cosine(model, path, images, PROMPTS)
    assert torch.allclose(scores, 2.5 * cos.clamp(min=0), atol=1e-6)


def test_aesthetic_reads_pth_and_safetensors_heads(tiny_clip, tmp_path):
    path, model = tiny_clip
    torch.manual_seed(1)
    head = RewardMLP(16).eval()
    torch.save(head.state_dict(), tmp_path / "head.pth")
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))
    images = uint8_images(3, 32, 32, seed=2)
    prompts = PROMPTS[:3]
    a = check_reward_fn(make_reward("aesthetic", weights=str(tmp_path / "head.pth"), model=str(path), device="cpu"),
                        images, prompts)
    b = make_reward("aesthetic", weights=str(tmp_path / "head.safetensors"), model=str(path), device="cpu")
    assert torch.equal(a, b(images, prompts, None))
    _, embeds = reference_cosine(model, path, images, prompts)
    with torch.no_grad():
        expected = head(F.normalize(embeds, dim=-1))
    assert torch.allclose(a, expected, atol=1e-5)


def test_aesthetic_refuses_missing_or_mismatched_heads(tiny_clip, tmp_path):
    path, _ = tiny_clip
    with pytest.raises(TempflowError, match="needs weights=PATH"):
        make_reward("aesthetic", model=str(path))
    torch.save(RewardMLP(768).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(TempflowError, match="768-dim"):
        make_reward("aesthetic", weights=str(tmp_path / "wide.pth"), model=str(path), device="cpu")
    torch.save({"something": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(TempflowError, match="layers.0.weight"):
        make_reward("aesthetic", weights=str(tmp_path / "bad.pth"), model=str(path), device="cpu")


def test_clip_rewards_report_bad_sources(tmp_path):
    with pytest.raises(TempflowError, match="pickscore"):
        make_reward("pickscore", model=str(tmp_path), processor=str(tmp_path), device="cpu")
    with pytest.raises(TempflowError, match="no option 'modle'"):
        make_reward("clipscore", modle="x")
