import json

import pytest
import torch

from tempflow.errors import ModelLoadError, PromptError
from tempflow.models import FlowModel, load_model
from tempflow.sampling import generate, initial_noise
from tempflow.shapes.model import ShapesFlowModel


def test_forward_shapes_and_protocol(tiny_model):
    assert isinstance(tiny_model, FlowModel)
    x = torch.randn(3, 3, 16, 16)
    cond = tiny_model.encode_prompts(["a red circle", "two squares", ""])
    assert cond.tokens.shape == (3, 16, 16) and cond.pooled.shape == (3, 16)
    v = tiny_model(x, torch.rand(3), cond)
    assert v.shape == x.shape
    assert tiny_model.latent_shape() == (3, 16, 16)


def test_guidance_one_is_the_conditional_velocity_and_cfg_is_linear(tiny_model):
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.8])
    cond = tiny_model.encode_prompts(["a red circle", "a blue square"])
    with torch.no_grad():
        vc = tiny_model(x, t, cond)
        vu = tiny_model(x, t, tiny_model.encode_prompts(["", ""]))
        assert torch.allclose(tiny_model.velocity(x, t, cond, 1.0), vc)
        assert torch.allclose(tiny_model.velocity(x, t, cond, 3.0), vu + 3.0 * (vc - vu), atol=1e-5)


def test_save_load_round_trip(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["_class_name"] == "ShapesFlowModel"
    assert (tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_model(str(tmp_path / "m"))
    a = generate(tiny_model, ["a red circle", "a square"], [1, 2], num_steps=3, guidance=2.0)
    b = generate(loaded, ["a red circle", "a square"], [1, 2], num_steps=3, guidance=2.0)
    assert torch.equal(a, b)
    assert a.shape == (2, 3, 16, 16) and a.min() >= 0 and a.max() <= 1


def test_noise_does_not_depend_on_batching():
    a = initial_noise((3, 8, 8), [5, 6, 7])
    b = initial_noise((3, 8, 8), [6])
    assert torch.equal(a[1], b[0])


def test_model_loading_errors(tmp_path, tiny_model):
    with pytest.raises(ModelLoadError, match="neither a shipped model"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_model(str(tmp_path / "empty"))
    tiny_model.save(tmp_path / "bad")
    (tmp_path / "bad" / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="corrupt or incomplete"):
        load_model(str(tmp_path / "bad"))
    (tmp_path / "bad" / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not a valid model index"):
        load_model(str(tmp_path / "bad"))


def test_prompts_outside_the_grammar_are_refused(tiny_model):
    tiny_model.check_prompts(["a red circle"])
    with pytest.raises(PromptError):
        tiny_model.check_prompts(["a photo of a cat"])


def test_text_encoder_ignores_padding(tiny_cfg):
    model = ShapesFlowModel(tiny_cfg)
    cond = model.encode_prompts(["a red circle"])
    n_real = 4  # <bos> a red circle
    assert torch.all(cond.tokens[0, n_real:] == 0)


def test_latent_model_round_trip(tmp_path):
    from tempflow.shapes.model import ShapesModelConfig

    cfg = ShapesModelConfig(image_size=16, patch_size=1, width=32, depth=1, heads=2, text_width=16, text_depth=1,
                            latent_channels=4, vae_channels=[8, 8])
    model = ShapesFlowModel(cfg).eval()
    assert model.latent_shape() == (4, 8, 8)
    images = torch.rand(2, 3, 16, 16)
    z = model.encode_images(images)
    assert z.shape == (2, 4, 8, 8)
    assert model.decode(z).shape == (2, 3, 16, 16)
    model.save(tmp_path / "m")
    assert (tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_model(str(tmp_path / "m"))
    a = generate(model, ["a red circle"], [3], num_steps=2, guidance=2.0)
    b = generate(loaded, ["a red circle"], [3], num_steps=2, guidance=2.0)
    assert torch.equal(a, b)
