"""HPSv2's open_clip weights in a transformers CLIPModel, checked against open_clip's computation written out here."""

import pytest
import torch
import torch.nn.functional as F

from tempflow.errors import TempflowError
from tempflow.rewards import make_reward
from tempflow.rewards.hps import clip_from_open_clip, convert_open_clip_state_dict
from tempflow.rewards.preprocess import ImageTransform
from test_rewards_clip import PROMPTS, check_reward_fn
from test_rewards_tiny import clip_config, clip_tokenizer, save_processor, uint8_images

VISION, TEXT, EMBED, LAYERS, PATCH, IMAGE, CONTEXT = 32, 24, 16, 2, 8, 32, 16


def open_clip_state_dict(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped as an open_clip ViT CLIP (built-in text tower) saves them."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def blocks(prefix: str, width: int) -> dict[str, torch.Tensor]:
        out = {}
        for i in range(LAYERS):
            p = f"{prefix}transformer.resblocks.{i}."
            out |= {p + "ln_1.weight": 1 + rnd(width), p + "ln_1.bias": rnd(width),
                    p + "attn.in_proj_weight": rnd(3 * width, width), p + "attn.in_proj_bias": rnd(3 * width),
                    p + "attn.out_proj.weight": rnd(width, width), p + "attn.out_proj.bias": rnd(width),
                    p + "ln_2.weight": 1 + rnd(width), p + "ln_2.bias": rnd(width),
                    p + "mlp.c_fc.weight": rnd(4 * width, width), p + "mlp.c_fc.bias": rnd(4 * width),
                    p + "mlp.c_proj.weight": rnd(width, 4 * width), p + "mlp.c_proj.bias": rnd(width)}
        return out

    n_tokens = (IMAGE // PATCH) ** 2 + 1
    return {
        "positional_embedding": rnd(CONTEXT, TEXT), "text_projection": rnd(TEXT, EMBED),
        "logit_scale": torch.tensor(4.6052), "token_embedding.weight": rnd(vocab, TEXT),
        "ln_final.weight": 1 + rnd(TEXT), "ln_final.bias": rnd(TEXT), **blocks("", TEXT),
        "visual.class_embedding": rnd(VISION), "visual.positional_embedding": rnd(n_tokens, VISION),
        "visual.proj": rnd(VISION, EMBED), "visual.conv1.weight": rnd(VISION, 3, PATCH, PATCH),
        "visual.ln_pre.weight": 1 + rnd(VISION), "visual.ln_pre.bias": rnd(VISION),
        "visual.ln_post.weight": 1 + rnd(VISION), "visual.ln_post.bias": rnd(VISION), **blocks("visual.", VISION),
    }


def hps_config():
    """The tiny architecture of open_clip_state_dict: plain GELU, as open_clip's ViT-H-14."""
    cfg = clip_config(act="gelu", image_size=IMAGE, context=CONTEXT)
    cfg.text_config.intermediate_size, cfg.vision_config.intermediate_size = 4 * TEXT, 4 * VISION
    return cfg


def _tower(x: torch.Tensor, sd: dict, prefix: str, heads: int, causal: bool) -> torch.Tensor:
    """open_clip's residual attention blocks: x + attn(ln_1(x)), then x + mlp(ln_2(x)); x (B, L, D)."""
    b, n, d = x.shape
    mask = torch.full((n, n), float("-inf")).triu(1) if causal else torch.zeros(n, n)
    for i in range(LAYERS):
        p = f"{prefix}transformer.resblocks.{i}."
        h = F.layer_norm(x, (d,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = (h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).split(d, dim=-1)
        q, k, v = (t.view(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        att = ((q @ k.transpose(-1, -2)) / (d // heads) ** 0.5 + mask).softmax(-1) @ v
        x = x + att.transpose(1, 2).reshape(b, n, d) @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = F.layer_norm(x, (d,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.gelu(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    return x


def reference_image_features(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)  # (B, N, D)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (VISION,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = _tower(x, sd, "visual.", heads=2, causal=False)
    return F.layer_norm(x[:, 0], (VISION,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]


def reference_text_features(sd: dict, ids: torch.Tensor) -> torch.Tensor:
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    x = _tower(x, sd, "", heads=2, causal=True)
    x = F.layer_norm(x, (TEXT,), sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(len(ids)), ids.argmax(dim=-1)] @ sd["text_projection"]  # pooled at end-of-text


def test_converted_model_computes_what_open_clip_computes():
    tok = clip_tokenizer()
    sd = open_clip_state_dict(len(tok))
    model = clip_from_open_clip(sd, hps_config())
    pixels = torch.randn(3, 3, IMAGE, IMAGE)
    ids = tok(PROMPTS[:3], padding="max_length", max_length=CONTEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    assert torch.allclose(image, reference_image_features(sd, pixels), atol=1e-5)
    assert torch.allclose(text, reference_text_features(sd, ids), atol=1e-5)
    assert torch.equal(model.logit_scale, sd["logit_scale"])


def test_converter_refuses_other_layouts():
    sd = open_clip_state_dict(518)
    with pytest.raises(TempflowError, match="unknown tensors .*ls_1.gamma"):
        convert_open_clip_state_dict({**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(VISION)})
    with pytest.raises(TempflowError, match="wrongly shaped"):
        clip_from_open_clip(open_clip_state_dict(99), hps_config())  # vocabulary of another size
    del sd["visual.proj"]
    with pytest.raises(TempflowError, match="1 missing tensors .*visual_projection"):
        clip_from_open_clip(sd, hps_config())


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hps")
    sd = open_clip_state_dict(len(clip_tokenizer()))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, root / "HPS_v2.1_compressed.pt")
    processor = save_processor(root / "processor")
    hps_config().save_pretrained(processor)
    return root, processor, sd


def test_hpsv2_reward_is_the_cosine_of_the_hps_embeddings(hps_files):
    root, processor, sd = hps_files
    reward = make_reward("hpsv2", model=str(root), processor=str(processor), device="cpu")
    check_reward_fn(reward, uint8_images(4, 48, 40), PROMPTS)
    images = uint8_images(4, 32, 32)
    scores = check_reward_fn(reward, images, PROMPTS)
    ids = clip_tokenizer()(PROMPTS, padding="max_length", max_length=CONTEXT, return_tensors="pt")["input_ids"]
    image = reference_image_features(sd, ImageTransform(32, None, (32, 32))(images))
    expected = F.cosine_similarity(image, reference_text_features(sd, ids))
    assert torch.allclose(scores, expected, atol=1e-5)


def test_hpsv2_loads_a_converted_folder_the_same(hps_files, tmp_path):
    root, processor, sd = hps_files
    clip_from_open_clip(sd, hps_config()).save_pretrained(tmp_path / "converted")
    images = uint8_images(2, 32, 32, seed=3)
    a = make_reward("hpsv2", model=str(root / "HPS_v2.1_compressed.pt"), processor=str(processor), device="cpu")
    b = make_reward("hpsv2", model=str(tmp_path / "converted"), processor=str(processor), device="cpu")
    assert torch.allclose(a(images, PROMPTS[:2], None), b(images, PROMPTS[:2], None), atol=1e-6)
