"""ImageReward from transformers' BLIP parts, checked against BLIP's computation written out here."""

import pytest
import torch
import torch.nn.functional as F

from tempflow.errors import TempflowError
from tempflow.rewards import make_reward
from tempflow.rewards.imagereward import SCORE_MEAN, SCORE_STD, convert_imagereward_state_dict, load_imagereward_model
from tempflow.rewards.preprocess import ImageTransform
from test_rewards_clip import check_reward_fn
from test_rewards_tiny import bert_tokenizer, uint8_images

VW, TW, LAYERS, PATCH, IMAGE, HEADS, VOCAB, POSITIONS, MAX_LEN = 32, 24, 2, 8, 32, 2, 17, 40, 12
PROMPTS = ["a red cat", "a photo of a dog on the square", "a red cat", "blue"]


def imagereward_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped as the published ImageReward checkpoint names them (tiny widths)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def linear(name, n_out, n_in):
        return {f"{name}.weight": rnd(n_out, n_in), f"{name}.bias": rnd(n_out)}

    def norm(name, width):
        return {f"{name}.weight": 1 + rnd(width), f"{name}.bias": rnd(width)}

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    sd = {v + "cls_token": rnd(1, 1, VW), v + "pos_embed": rnd(1, (IMAGE // PATCH) ** 2 + 1, VW),
          v + "patch_embed.proj.weight": rnd(VW, 3, PATCH, PATCH), v + "patch_embed.proj.bias": rnd(VW),
          **norm(v + "norm", VW), t + "embeddings.word_embeddings.weight": rnd(VOCAB, TW),
          t + "embeddings.position_embeddings.weight": rnd(POSITIONS, TW), **norm(t + "embeddings.LayerNorm", TW),
          t + "embeddings.position_ids": torch.arange(POSITIONS)[None]}
    for i in range(LAYERS):
        b = f"{v}blocks.{i}."
        sd |= {**norm(b + "norm1", VW), **linear(b + "attn.qkv", 3 * VW, VW), **linear(b + "attn.proj", VW, VW),
               **norm(b + "norm2", VW), **linear(b + "mlp.fc1", 4 * VW, VW), **linear(b + "mlp.fc2", VW, 4 * VW)}
        b = f"{t}encoder.layer.{i}."
        for att, kv_width in (("attention", TW), ("crossattention", VW)):
            sd |= {**linear(b + att + ".self.query", TW, TW), **linear(b + att + ".self.key", TW, kv_width),
                   **linear(b + att + ".self.value", TW, kv_width), **linear(b + att + ".output.dense", TW, TW),
                   **norm(b + att + ".output.LayerNorm", TW)}
        sd |= {**linear(b + "intermediate.dense", 4 * TW, TW), **linear(b + "output.dense", TW, 4 * TW),
               **norm(b + "output.LayerNorm", TW)}
    for i, (n_out, n_in) in zip((0, 2, 4, 6, 7), ((1024, TW), (128, 1024), (64, 128), (16, 64), (1, 16))):
        sd |= linear(f"mlp.layers.{i}", n_out, n_in)
    sd |= linear("blip.vision_proj", 8, VW) | linear("blip.itm_head", 2, TW)  # in the checkpoint, unused by the score
    return sd


def _attend(q, k, v, heads, mask=None):
    """Multi-head softmax attention of (B, Lq, D) queries on (B, Lk, D) keys and values."""
    b, lq, d = q.shape
    q, k, v = (t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, d)


def _lin(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _ln(x, sd, name, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps)


def reference_vit(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    """BLIP's timm-style pre-norm ViT: all tokens after the final norm, (B, 1 + N, VW)."""
    v = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd[v + "cls_token"].expand(len(x), 1, VW), x.flatten(2).transpose(1, 2)], 1) + sd[v + "pos_embed"]
    for i in range(LAYERS):
        b = f"{v}blocks.{i}."
        q, k, val = _lin(_ln(x, sd, b + "norm1", 1e-6), sd, b + "attn.qkv").split(VW, dim=-1)
        x = x + _lin(_attend(q, k, val, HEADS), sd, b + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    return _ln(x, sd, v + "norm", 1e-6)


def reference_score(sd: dict, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BLIP's post-norm BERT encoder with cross-attention to the image, first token, MLP head, standardised."""
    image, t = reference_vit(sd, pixels), "blip.text_encoder."
    positions = sd[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    x = sd[t + "embeddings.word_embeddings.weight"][ids] + positions
    x = _ln(x, sd, t + "embeddings.LayerNorm", 1e-12)
    for i in range(LAYERS):
        b = f"{t}encoder.layer.{i}."
        for att, kv, kv_mask in (("attention", x, mask), ("crossattention", image, None)):
            a = _attend(_lin(x, sd, b + att + ".self.query"), _lin(kv, sd, b + att + ".self.key"),
                        _lin(kv, sd, b + att + ".self.value"), HEADS, kv_mask)
            x = _ln(_lin(a, sd, b + att + ".output.dense") + x, sd, b + att + ".output.LayerNorm", 1e-12)
        h = _lin(F.gelu(_lin(x, sd, b + "intermediate.dense")), sd, b + "output.dense")
        x = _ln(h + x, sd, b + "output.LayerNorm", 1e-12)
    h = x[:, 0]
    for i in (0, 2, 4, 6, 7):
        h = _lin(h, sd, f"mlp.layers.{i}")
    return (h.squeeze(-1) - SCORE_MEAN) / SCORE_STD


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagereward")
    sd = imagereward_state_dict()
    torch.save(sd, root / "ImageReward.pt")
    return root, bert_tokenizer(root / "tokenizer"), sd


def test_model_computes_what_blip_computes(files):
    _, tok_dir, sd = files
    from transformers import AutoTokenizer

    model = load_imagereward_model(sd, vision_heads=HEADS, text_heads=HEADS)
    tok = AutoTokenizer.from_pretrained(tok_dir)(PROMPTS, padding="max_length", max_length=MAX_LEN, return_tensors="pt")
    pixels = torch.randn(4, 3, IMAGE, IMAGE)
    with torch.no_grad():
        assert torch.allclose(model.vision(pixel_values=pixels).last_hidden_state, reference_vit(sd, pixels),
                              atol=1e-5)
        ours = model(pixels, tok["input_ids"], tok["attention_mask"])
    assert torch.allclose(ours, reference_score(sd, pixels, tok["input_ids"], tok["attention_mask"]), atol=1e-5)


def test_imagereward_reward(files):
    root, tok_dir, sd = files
    reward = make_reward("imagereward", model=str(root), tokenizer=str(tok_dir), vision_heads=HEADS,
                         text_heads=HEADS, max_length=MAX_LEN, device="cpu", batch_size=3)
    check_reward_fn(reward, uint8_images(4, 40, 36), PROMPTS)
    images = uint8_images(4, 32, 32)
    scores = check_reward_fn(reward, images, PROMPTS)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)(PROMPTS, padding="max_length", max_length=MAX_LEN, return_tensors="pt")
    pixels = ImageTransform(IMAGE, None, (IMAGE, IMAGE))(images)
    assert torch.allclose(scores, reference_score(sd, pixels, tok["input_ids"], tok["attention_mask"]), atol=1e-5)


def test_converter_keeps_what_the_score_uses_and_refuses_other_checkpoints(files):
    _, _, sd = files
    converted = convert_imagereward_state_dict(sd)
    assert not any("vision_proj" in k or "itm_head" in k or k.endswith("position_ids") for k in converted)
    assert converted["vision.embeddings.class_embedding"] is sd["blip.visual_encoder.cls_token"]
    with pytest.raises(TempflowError, match="unknown vision tensors"):
        convert_imagereward_state_dict({**sd, "blip.visual_encoder.blocks.0.ls1.gamma": torch.ones(VW)})
    missing = {k: v for k, v in sd.items() if "crossattention.self.key" not in k}
    with pytest.raises(TempflowError, match="crossattention.self.key"):
        load_imagereward_model(missing, HEADS, HEADS)
