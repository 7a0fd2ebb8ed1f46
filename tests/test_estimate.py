"""The memory estimate: its sizes against the real modules, its rollout bookkeeping against the tensors a
real rollout holds (tiny SD3 and FLUX pipelines built offline), its bound on the paper presets, the
command, and the table in docs/real_models.md."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from tempflow import rewards as reward_registry
from tempflow.bench.estimate import batch_bytes, estimate, markdown_table, rollout_tensors, units_per_process
from tempflow.bench.model_sizes import FLOAT, build_on_meta, model_sizes, module_bytes, pipeline_spec
from tempflow.bench.presets import expand_configs
from tempflow.bench.published_configs import PUBLISHED
from tempflow.config import load_config
from tempflow.errors import ConfigError
from tempflow.training.config import TrainConfig
from tempflow.training.loop import Trainer

PRESETS = {"sd3": "configs/sd35m/{}_pickscore.yaml", "flux": "configs/flux/{}_hpsv3.yaml"}
DOC_COMMAND = ("tempflow bench system --estimate --config 'configs/sd35m/*.yaml,configs/flux/*.yaml' "
               "--processes 1,8 --markdown")


@pytest.fixture(autouse=True)
def _reward(monkeypatch):
    monkeypatch.setitem(reward_registry.REWARDS, "varied",
                        lambda **_: lambda images, prompts, meta: images[:, 0].float().mean(dim=(1, 2)))


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict:
    from diffusers_tiny import PROMPTS, build_flux, build_sd3

    root = tmp_path_factory.mktemp("pipes")
    (root / "prompts.txt").write_text("\n".join(PROMPTS))
    return {"sd3": build_sd3(root / "sd3"), "flux": build_flux(root / "flux"), "prompts": root / "prompts.txt"}


def tiny_config(pipes: dict, family: str, algorithm: str, *extra: str) -> TrainConfig:
    from diffusers_tiny import RES, T5_TOKENS

    return load_config(TrainConfig, PRESETS[family].format(algorithm), [
        f"model={pipes[family]}", "model_options.device=cpu", "model_options.dtype=fp32",
        f"model_options.resolution={RES}", f"model_options.max_sequence_length={T5_TOKENS}",
        "model_options.offload=false", f"prompts={pipes['prompts']}", "reward=varied", "rollout.prompts_per_iter=2",
        "rollout.num_steps=6", "rollout.max_batch=5", "eval.every=0", "lora.rank=4", "threads=1", *extra])


CASES = [  # (family, algorithm, overrides): every algorithm's batch, with the options that add fields
    ("sd3", "tempflow", ["rollout.seeds_per_prompt=2", "algorithm.children=3", "algorithm.ratio=guard"]),
    ("flux", "tempflow", ["rollout.seeds_per_prompt=2", "algorithm.children=2", "algorithm.branch_sample=2"]),
    ("sd3", "flow_grpo", ["rollout.seeds_per_prompt=3", "algorithm.ratio=guard"]),
    ("sd3", "nft", ["rollout.seeds_per_prompt=3", "algorithm.timesteps=3"]),
    ("flux", "awm", ["rollout.seeds_per_prompt=3", "algorithm.timesteps=3"]),
    ("sd3", "tempflow_nft", ["rollout.seeds_per_prompt=2", "algorithm.children=3", "algorithm.draws=2"]),
]


@pytest.mark.parametrize("family,algorithm,extra", CASES)
def test_rollout_bookkeeping_is_what_a_real_rollout_holds(pipes, tmp_path, family, algorithm, extra):
    cfg = tiny_config(pipes, family, algorithm, *extra)
    tr = Trainer(cfg, tmp_path / f"run{time.perf_counter_ns()}")
    ro = tr.rollout(tr.sampler.next(cfg.rollout.prompts_per_iter))
    sizes = model_sizes(cfg)
    assert sizes.latent == tr.model.latent_shape() and sizes.image == tuple(ro.images.shape[1:])
    units = units_per_process(cfg, 1)
    expected = rollout_tensors(cfg, sizes.latent, sizes.image, units)
    assert batch_bytes(ro) == {k: b for k, (b, _) in expected.items()}
    assert expected["images"][1] == "host" and ro.images.device.type == "cpu"


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sizes_from_the_folder_are_the_loaded_models(pipes, tmp_path, family):
    cfg = tiny_config(pipes, family, "tempflow", "rollout.seeds_per_prompt=2")
    tr = Trainer(cfg, tmp_path / "run")
    sizes = model_sizes(cfg)
    pipe = tr.model.pipe
    for name in sizes.params:
        module = getattr(pipe, name)
        assert sizes.params[name] == sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n), name
    assert sizes.trained_params == sum(p.numel() for p in tr.params)
    assert sizes.weights["vae"] == module_bytes(pipe.vae, 4)  # float32 here: parameters and buffers
    cond = tr.encode(["a red cat"])
    assert sizes.cond_row_bytes == cond.tokens[0].nbytes + cond.pooled[0].nbytes
    assert sizes.text_tokens == cond.tokens.shape[1]


def test_published_models_build_on_the_meta_device_with_their_known_sizes():
    counts = {}
    for model, spec in PUBLISHED.items():
        module = build_on_meta(*spec["transformer"])
        assert all(p.device.type == "meta" for p in module.parameters())
        counts[model] = sum(p.numel() for p in module.parameters())
    assert counts == {"stabilityai/stable-diffusion-3.5-medium": 2_243_171_520,
                      "stabilityai/stable-diffusion-3.5-large": 8_056_627_520,
                      "black-forest-labs/FLUX.1-dev": 11_901_408_320}
    t5 = build_on_meta(*pipeline_spec("black-forest-labs/FLUX.1-dev")["text_encoder_2"])
    assert sum(p.numel() for p in t5.parameters()) == 4_762_310_656


def test_the_paper_presets_hold_their_documented_bound():
    """docs/real_models.md: a branching rollout holds on the device, per child, one next state, 1/M of its
    branch state and one log-probability; its images are in host memory."""
    for family in ("sd3", "flux"):
        for algorithm in ("tempflow", "tempflow_nft"):
            cfg = load_config(TrainConfig, PRESETS[family].format(algorithm))
            sizes, a = model_sizes(cfg), cfg.algorithm
            children = 48 * 4 * 9 * 6  # prompts x seeds x branch points x children, on one process
            assert cfg.rollout.prompts_per_iter * cfg.rollout.seeds_per_prompt * 9 * a.children == children
            held = rollout_tensors(cfg, sizes.latent, sizes.image, units_per_process(cfg, 1))
            device = sum(b for b, where in held.values() if where == "device")
            per_child = sizes.latent_bytes * (1 + 1 / a.children) + FLOAT
            assert device <= children * per_child
            assert held["images"] == (children * sizes.image_bytes, "host")
            est = estimate(cfg, 8)
            assert est.items["rollout_held"] <= math.ceil(children / 8) * per_child


def test_estimate_refuses_what_it_cannot_size():
    cfg = load_config(TrainConfig, "configs/shapes/tempflow.yaml")
    with pytest.raises(ConfigError, match="no configuration of model 'shapes-base'"):
        estimate(cfg)
    cfg = load_config(TrainConfig, "configs/sd35m/tempflow_pickscore.yaml", ["rollout.prompts_per_iter=1"])
    with pytest.raises(ConfigError, match="cannot share 4 units"):
        estimate(cfg, 5)
    assert "configs/sd35m/base.yaml" not in expand_configs("configs/sd35m/*.yaml")


def test_estimate_command(capsys):
    from tempflow.cli import main

    assert main(["bench", "system", "--estimate", "--config", "configs/sd35m/tempflow_pickscore.yaml",
                 "--processes", "1,8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [e["processes"] for e in out] == [1, 8] and out[0]["units_per_process"] == 192
    assert out[0]["peak_bytes"] == max(out[0]["phases"].values()) > out[1]["peak_bytes"]
    assert main(["bench", "system", "--estimate", "--config", "configs/flux/tempflow_hpsv3.yaml"]) == 0
    assert "peak on the device" in capsys.readouterr().out
    assert main(["bench", "system", "--estimate", "--processes", "0"]) == 2


def test_the_documented_table_is_the_estimate():
    text = Path("docs/real_models.md").read_text(encoding="utf-8")
    assert DOC_COMMAND in text
    configs = expand_configs("configs/sd35m/*.yaml,configs/flux/*.yaml")
    table = markdown_table([estimate(load_config(TrainConfig, c), w, name=c) for c in configs for w in (1, 8)])
    assert table in text, "regenerate the table of docs/real_models.md with: " + DOC_COMMAND
