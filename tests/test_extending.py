"""docs/extending.md's worked examples, run as the page writes them: an algorithm and its preset, a model
adapter, a reward and a world, each registered by --import (or, for the algorithm, named by its dotted
path)."""

import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch

from tempflow.algorithms import ALGORITHMS
from tempflow.cli import main
from tempflow.models import LOADERS
from tempflow.rewards import REWARDS
from tempflow.worlds import _registered as registered_worlds

PAGE = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
TINY = ["iterations=2", "rollout.prompts_per_iter=2", "rollout.num_steps=4", "eval.every=2", "eval.limit=4",
        "eval.num_steps=2", "threads=1"]


def page_files() -> dict[str, str]:
    """Every code block of the page by the file name its first line gives ("# rwr.py: ...")."""
    blocks = re.findall(r"```\w+\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S)
    return {re.match(r"# (\S+?):", b).group(1): b for b in blocks if re.match(r"# \S+?:", b)}


@pytest.fixture
def example(tmp_path, monkeypatch):
    """The page's files, written into tmp_path, which is on sys.path; what they register is undone after."""
    for name, text in page_files().items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("tempflow.models.LOADERS", dict(LOADERS))
    monkeypatch.setattr("tempflow.rewards.REWARDS", dict(REWARDS))
    worlds = dict(registered_worlds)
    yield tmp_path
    ALGORITHMS.pop("rwr", None)
    registered_worlds.clear()
    registered_worlds.update(worlds)
    for module in ("rwr", "rescaled_sd3", "warmth", "colour_world"):
        sys.modules.pop(module, None)  # the next test imports the page's module afresh


def test_the_page_has_every_example():
    assert set(page_files()) == {"rwr.py", "rwr.yaml", "rescaled_sd3.py", "warmth.py", "colour_world.py",
                                 "colours.txt"}


def _sets(model: str) -> list[str]:
    return [a for s in [f"model={model}", *TINY] for a in ("--set", s)]


def test_the_algorithm_trains_by_import_and_resumes_by_dotted_path(example, tiny_model_dir, capsys):
    run = example / "run"
    assert main(["train", "--import", "rwr", "--config", str(example / "rwr.yaml"), "--out", str(run),
                 *_sets(tiny_model_dir)]) == 0
    rows = [r for r in (run / "metrics.jsonl").read_text().splitlines() if "fm_error" in r]
    assert len(rows) == 2 and (run / "final").is_dir()
    ALGORITHMS.pop("rwr")
    dotted = example / "run_dotted"
    assert main(["train", "--config", str(example / "rwr.yaml"), "--out", str(dotted), *_sets(tiny_model_dir),
                 "--set", "algorithm.name=rwr:RewardWeighted", "--set", "iterations=1"]) == 0
    assert main(["train", "--resume", str(dotted), "--set", "iterations=2"]) == 0
    assert "fm_error" in (dotted / "metrics.jsonl").read_text().splitlines()[-2]


def test_the_algorithms_options_are_checked(example, tiny_model_dir, capsys):
    args = ["train", "--import", "rwr", "--config", str(example / "rwr.yaml"), "--out", str(example / "bad"),
            *_sets(tiny_model_dir)]
    assert main([*args, "--set", "algorithm.temperature=0"]) == 2
    assert "algorithm.temperature must be > 0" in capsys.readouterr().err
    assert main([*args, "--set", "algorithm.children=4"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'algorithm.children'" in err and "tempflow_grpo" in err
    assert main(["train", "--config", str(example / "rwr.yaml"), "--out", str(example / "bad2"),
                 "--set", "algorithm.name=rwr:Missing"]) == 2
    assert "cannot be imported" in capsys.readouterr().err


def test_the_model_adapter_rescales_guidance_and_evaluates_with_a_reward(example, tmp_path, capsys):
    from diffusers_tiny import build_sd3
    from tempflow.models import load_model
    from tempflow.models.sd3 import SD3FlowModel

    folder = build_sd3(tmp_path / "sd3")
    plain = load_model(str(folder))
    __import__("rescaled_sd3")
    model = load_model(str(folder))
    assert type(model).__name__ == "RescaledSD3" and type(plain) is SD3FlowModel
    x, t = torch.randn(2, *model.latent_shape()), torch.full((2,), 0.6)
    cond = model.encode_prompts(["a red circle", "a blue square"])
    assert torch.equal(model.velocity(x, t, cond, 1.0), plain.velocity(x, t, cond, 1.0))
    guided, cfg = model.velocity(x, t, cond, 4.0), plain.velocity(x, t, cond, 4.0)
    v_cond = plain.velocity(x, t, cond, 1.0)
    assert not torch.allclose(guided, cfg)
    want = 0.7 * cfg * (v_cond.std((1, 2, 3), keepdim=True) / cfg.std((1, 2, 3), keepdim=True)) + 0.3 * cfg
    torch.testing.assert_close(guided, want)
    prompts = tmp_path / "my.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "m.json"
    assert main(["eval", "--import", "rescaled_sd3", "--model", str(folder), "--prompts", str(prompts),
                 "--reward", "jpeg_compressibility", "--steps", "2", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["metric"] == "reward" and list(summary["per_category"]) == ["my"] and summary["n"] == 2


def test_the_reward_scores_warm_images_higher_and_reports_per_prompt_set(example, tiny_model_dir, tmp_path, capsys):
    from tempflow.rewards import make_reward

    __import__("warmth")
    images = torch.zeros(2, 3, 8, 8)
    images[0, 0], images[1, 2] = 1.0, 1.0  # red, blue
    assert make_reward("warmth(strength=2)")(images, ["a", "b"], [{}, {}]).tolist() == [2.0, -2.0]
    out = tmp_path / "w.json"
    assert main(["eval", "--import", "warmth", "--reward", "warmth", "--prompts", "shapes-eval,shapes-train",
                 "--limit", "3", "--model", tiny_model_dir, "--steps", "2", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert set(summary["per_category"]) == {"shapes-eval", "shapes-train"} and summary["n"] == 6
    assert summary["overall"] == pytest.approx(sum(summary["per_category"].values()) / 2)
    assert "prompt set" in capsys.readouterr().out


def test_the_world_evaluates_strata_and_trains(example, tiny_model_dir, tmp_path, capsys):
    from tempflow.evaluate import verifier_scoring
    from tempflow.prompts import load_prompts, prompt_strata
    from tempflow.worlds import world_of
    from tempflow.worlds.shapes.grammar import parse_prompt
    from tempflow.worlds.shapes.scenes import render_batch, scene_for

    world = __import__("colour_world").WORLD
    lines = load_prompts("colours")
    assert len(lines) == 6 and world_of(lines, ["colours"]) is world
    assert prompt_strata(lines, "category", "colours") == [[0, 1, 2], [3, 4, 5]]
    images = torch.from_numpy(render_batch([scene_for(parse_prompt(p), random.Random(i)) for i, p in enumerate(lines)]))
    verdict = world.judge(images, lines)
    assert verdict.strict.all() and verdict.failures == [None] * 6
    wrong = world.judge(images, lines[::-1])
    assert not wrong.strict.any() and set(wrong.failures) == {"colour"}
    assert verifier_scoring(world, lines).labels == ["warm"] * 3 + ["cool"] * 3

    out = tmp_path / "c.json"
    assert main(["eval", "--import", "colour_world", "--prompts", "colours", "--model", tiny_model_dir,
                 "--steps", "2", "--failures", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert set(summary["per_category"]) == {"warm", "cool"} and set(summary["failures"]["warm"]) == {
        "no object", "colour"}
    assert main(["prompts", "--import", "colour_world", "--set", "colours", "--show-category"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "cool\ta cyan triangle"

    run = tmp_path / "run"
    assert main(["train", "--import", "colour_world", "--config", "configs/shapes/tempflow.yaml", "--out", str(run),
                 *_sets(tiny_model_dir), "--set", "prompts=colours", "--set", "eval.prompts=colours",
                 "--set", "prompt_balance=category"]) == 0
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_warm" in r and "eval_cool" in r for r in rows)
