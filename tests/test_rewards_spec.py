import math
import subprocess
import sys

import pytest
import torch

from tempflow.errors import TempflowError
from tempflow.rewards import REWARDS, RewardSpec, available_rewards, make_reward, parse_reward_spec
from tempflow.worlds.shapes.reward import make_shapes_reward


def test_parse_reward_spec():
    assert parse_reward_spec("shapes") == [RewardSpec("shapes", 1.0, "none", {})]
    assert parse_reward_spec(" pickscore:1.0, jpeg_compressibility : -0.5 ") == [
        RewardSpec("pickscore", 1.0, "none", {}), RewardSpec("jpeg_compressibility", -0.5, "none", {})]
    terms = parse_reward_spec("pickscore(norm=running):2,aesthetic(norm=batch, weights=/ckpt/sac.pth, batch_size=8)")
    assert terms == [RewardSpec("pickscore", 2.0, "running", {}),
                     RewardSpec("aesthetic", 1.0, "batch", {"weights": "/ckpt/sac.pth", "batch_size": 8})]
    opts = parse_reward_spec("x(a=1.5, b=true, c=none, d='q', e=float16)")[0].options
    assert opts == {"a": 1.5, "b": True, "c": None, "d": "q", "e": "float16"}


@pytest.mark.parametrize("spec, message", [
    ("", "empty reward spec"),
    ("pickscore:abc", "bad weight 'abc'"),
    ("pickscore:inf", "must be finite"),
    ("pickscore(norm=zscore)", "unknown norm 'zscore'.*none, batch, running"),
    ("pickscore,pickscore:2", "appears twice"),
    ("pickscore(norm=batch", "unbalanced"),
    ("pickscore(weights)", "bad option 'weights'"),
    ("pick score", "bad reward term"),
    ("a,,b", "bad reward term ''"),
])
def test_parse_errors_say_what_to_write(spec, message):
    with pytest.raises(TempflowError, match=message):
        parse_reward_spec(spec)


def test_unknown_reward_names_the_available_ones():
    with pytest.raises(TempflowError) as err:
        make_reward("shapes:1,pikscore:0.5")
    text = str(err.value)
    assert "\n" not in text and "unknown reward 'pikscore'" in text
    assert all(name in text for name in available_rewards())


def constant(values):
    """A factory of a reward that returns fixed scores (plus an offset option)."""

    def factory(offset: float = 0.0):
        def reward(images, prompts, metadata):
            return torch.tensor(values, dtype=torch.float32) + offset

        return reward

    return factory


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(REWARDS, "a", constant([1.0, 2.0, 3.0, 4.0]))
    monkeypatch.setitem(REWARDS, "b", constant([4.0, 0.0, 2.0, 2.0]))
    monkeypatch.setitem(REWARDS, "c", constant([1.0, float("nan"), 3.0, 1.0]))


def call(reward, n=4):
    meta = [{"seed": i} for i in range(n)]
    return reward(torch.zeros(n, 3, 8, 8), ["p"] * n, meta), meta


def test_weighted_sum_and_raw_scores_in_metadata(fake):
    scores, meta = call(make_reward("a:2,b:-0.5"))
    assert scores.dtype == torch.float32 and torch.equal(scores, torch.tensor([0.0, 4.0, 5.0, 7.0]))
    assert meta[1] == {"seed": 1, "rewards": {"a": 2.0, "b": 0.0}}
    assert torch.equal(call(make_reward("a"))[0], torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_options_and_keyword_arguments_reach_the_factories(fake):
    assert torch.equal(call(make_reward("a(offset=10)"))[0], torch.tensor([11.0, 12.0, 13.0, 14.0]))
    assert torch.equal(call(make_reward("a", offset=1))[0], torch.tensor([2.0, 3.0, 4.0, 5.0]))
    combined = make_reward("a(offset=10),b:0", a={"offset": 20})  # keyword arguments override the spec
    assert torch.equal(call(combined)[0], torch.tensor([21.0, 22.0, 23.0, 24.0]))
    with pytest.raises(TempflowError, match="name=\\{...\\}"):
        make_reward("a,b", offset=1)
    with pytest.raises(TempflowError, match="no option 'qualty'.*quality"):
        make_reward("jpeg_compressibility(qualty=50)")


def test_batch_normalisation(fake):
    scores, meta = call(make_reward("a(norm=batch)"))
    z = torch.tensor([-3.0, -1.0, 1.0, 3.0]) / math.sqrt(5.0)  # mean 2.5, population std sqrt(1.25)
    assert torch.allclose(scores, z, atol=1e-5)
    assert meta[0]["rewards"]["a"] == 1.0  # raw, not normalised


def test_nan_is_not_hidden(fake):
    scores, meta = call(make_reward("c(norm=batch),a:0"))
    # finite entries 1, 3, 1: mean 5/3, population std sqrt(8/9); z = (x - 5/3) / sqrt(8/9)
    expected = torch.tensor([(1 - 5 / 3), float("nan"), (3 - 5 / 3), (1 - 5 / 3)]) / math.sqrt(8 / 9)
    assert torch.allclose(scores, expected, atol=1e-5, equal_nan=True)
    assert math.isnan(meta[1]["rewards"]["c"])
    running = make_reward("c(norm=running)")
    call(running)
    assert running.state_dict() == {"c": {"count": 3, "mean": pytest.approx(5 / 3), "m2": pytest.approx(8 / 3)}}


def test_running_normalisation_resumes_exactly(monkeypatch):
    batches = iter([[1.0, 3.0], [5.0], [2.0, 8.0]])
    monkeypatch.setitem(REWARDS, "r", lambda: lambda images, prompts, meta: torch.tensor(next(batches)))
    reward = make_reward("r(norm=running):2")
    first, _ = call(reward, 2)  # mean 2, std 1
    assert torch.allclose(first, 2 * torch.tensor([-1.0, 1.0]), atol=1e-5)
    state = reward.state_dict()
    assert state == {"r": {"count": 2, "mean": 2.0, "m2": 2.0}}
    second, _ = call(reward, 1)  # 1, 3, 5: mean 3, std sqrt(8/3)
    assert torch.allclose(second, 2 * torch.tensor([2 / math.sqrt(8 / 3)]), atol=1e-5)

    batches = iter([[5.0], [2.0, 8.0]])
    resumed = make_reward("r(norm=running):2")
    resumed.load_state_dict(state)
    assert torch.equal(call(resumed, 1)[0], second)
    with resumed.frozen():
        call(resumed, 2)
    assert resumed.state_dict() == reward.state_dict()
    with pytest.raises(TempflowError, match="same reward spec"):
        make_reward("r").load_state_dict(state)


def test_single_name_is_the_plain_reward_plus_metadata():
    prompts = ["a red circle", "two blue squares", "a green triangle above a red circle"]
    images = torch.rand(3, 3, 32, 32)
    meta = [{} for _ in prompts]
    scores = make_reward("shapes")(images, prompts, meta)
    plain_meta = [{} for _ in prompts]
    assert torch.equal(scores, make_shapes_reward()(images, prompts, plain_meta))
    assert meta[0]["rewards"]["shapes"] == float(scores[0]) and meta[0]["category"] == plain_meta[0]["category"]
    assert make_reward("shapes", strict=True)(images, prompts, None).shape == (3,)


def test_a_missing_optional_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(TempflowError, match=r"needs the package 'transformers'.*pip install tempflow\[rewards\]"):
        make_reward("pickscore", model="some/model")


def test_importing_the_registry_stays_light():
    code = "import sys, tempflow.rewards; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_custom_reward_as_in_the_readme(monkeypatch):
    import torch

    from tempflow.rewards import REWARDS, make_reward

    def make_brightness(target: float = 0.5):
        def reward(images, prompts, metadata):
            return -(images.mean(dim=(1, 2, 3)) - target).abs()
        return reward

    monkeypatch.setitem(REWARDS, "brightness", make_brightness)
    fn = make_reward("brightness(target=0.4)")
    images = torch.stack([torch.full((3, 4, 4), 0.4), torch.full((3, 4, 4), 0.9)])
    assert fn(images, ["a", "b"], [{}, {}]).tolist() == pytest.approx([0.0, -0.5], abs=1e-6)
