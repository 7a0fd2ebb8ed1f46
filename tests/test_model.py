import json

import pytest
import torch

from tempflow.errors import ConfigError, ModelLoadError, PromptError
from tempflow.models import FlowModel, ModelOptions, compile_flow, load_model
from tempflow.sampling import generate, initial_noise
from tempflow.worlds.shapes.model import ShapesFlowModel


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


def test_compiled_model_matches_eager_and_follows_in_place_weight_changes(tiny_model_dir):
    eager = load_model(tiny_model_dir)
    model = load_model(tiny_model_dir, ModelOptions(compile=True))
    assert model.transformer._compiled_call_impl is not None  # compiled in place: same module, same names
    assert list(model.transformer.state_dict()) == list(eager.transformer.state_dict())

    def velocities(m: FlowModel, rows: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(rows)
        x = torch.randn(rows, *m.latent_shape(), generator=g)
        t = torch.rand(rows, generator=g)
        with torch.no_grad():
            return m.velocity(x, t, m.encode_prompts(["a red circle"] * rows), 3.0)

    for rows in (3, 5):  # dynamic shapes: another batch size is the same compiled code
        torch.testing.assert_close(velocities(model, rows), velocities(eager, rows), atol=1e-5, rtol=1e-4)
    # full fine-tuning: the trained weights move in place (optimizer steps, the EMA swap) and the frozen
    # reference, a copy made after compiling, keeps the base's velocity
    model.prepare_finetune(lora=False)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(velocities(model, 3), velocities(eager, 3), atol=1e-3)
    with model.reference():
        torch.testing.assert_close(velocities(model, 3), velocities(eager, 3), atol=1e-5, rtol=1e-4)


def test_compile_without_a_cpu_compiler_is_refused(tiny_model, monkeypatch):
    monkeypatch.setattr("tempflow.models.base.shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match=r"needs a C\+\+ compiler .* model_options.compile=false"):
        compile_flow(tiny_model)
    assert tiny_model.transformer._compiled_call_impl is None
    with pytest.raises(ConfigError, match="no flow transformer"):
        compile_flow(torch.nn.Linear(2, 2))


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
    from tempflow.worlds.shapes.model import ShapesModelConfig

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
