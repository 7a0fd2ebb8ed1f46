"""Every registered reward scores an image with a NaN or infinite pixel as NaN, and is not shown it:
the reward layer's one rule (``tempflow.rewards.spec.FiniteRows``), not each reward's own."""

import contextlib
import math
import random
import threading

import pytest
import torch
from safetensors.torch import save_file

from tempflow.errors import TempflowError
from tempflow.rewards import REWARDS, available_rewards, make_reward
from tempflow.rewards.mlp import RewardMLP
from tempflow.rewards.server import make_server
from tempflow.rewards.spec import finite_images, score_finite
from tempflow.worlds.shapes.prompts import random_spec
from tempflow.worlds.shapes.scenes import render_batch, scene_for
from test_rewards_hps import hps_config, open_clip_state_dict
from test_rewards_imagereward import HEADS, MAX_LEN, imagereward_state_dict
from test_rewards_tiny import bert_tokenizer, clip_tokenizer, save_clip, save_processor, uint8_images

CLIP_PROMPTS = ["a red cat", "a photo of a dog", "a red cat", "blue square", "the dog"]


def shapes_images(n: int = 5) -> tuple[torch.Tensor, list[str]]:
    rng = random.Random(0)
    specs = [random_spec(rng) for _ in range(n)]
    images = torch.from_numpy(render_batch([scene_for(s, rng) for s in specs], 32))  # (n, 3, 32, 32)
    prompts = [s.text() for s in specs]
    prompts[3] = prompts[4]  # a wrong caption, so that the scores differ
    return images, prompts


@contextlib.contextmanager
def shapes_server():
    server = make_server("shapes", port=0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def builders(tmp_path_factory):
    """name -> a function that yields (reward spec options, images, prompts) inside a context, for every
    registered reward, each built offline from tiny random weights where it has a model."""
    root = tmp_path_factory.mktemp("finite")
    torch.manual_seed(0)
    clip, _ = save_clip(root / "clip")
    head = RewardMLP(16).eval()
    save_file(head.state_dict(), str(root / "head.safetensors"))
    sd = open_clip_state_dict(len(clip_tokenizer()))
    (root / "hps").mkdir()
    torch.save({"state_dict": sd}, root / "hps" / "HPS_v2.1_compressed.pt")
    processor = save_processor(root / "hps_processor")
    hps_config().save_pretrained(processor)
    (root / "ir").mkdir()
    torch.save(imagereward_state_dict(), root / "ir" / "ImageReward.pt")
    tokenizer = bert_tokenizer(root / "ir_tokenizer")

    shapes = shapes_images()
    pictures = (uint8_images(5, 32, 32), CLIP_PROMPTS)

    def plain(options=None, batch=shapes):
        @contextlib.contextmanager
        def build():
            yield options or {}, *batch

        return build

    @contextlib.contextmanager
    def remote():
        with shapes_server() as url:
            yield {"url": url, "batch_size": 2}, *shapes

    model = {"device": "cpu"}
    return {
        "shapes": plain(), "shapes_strict": plain(), "shapes_graded": plain(),
        "jpeg_compressibility": plain(batch=pictures), "jpeg_incompressibility": plain(batch=pictures),
        "pickscore": plain({"model": str(clip), "processor": str(clip), **model}, pictures),
        "clipscore": plain({"model": str(clip), **model}, pictures),
        "aesthetic": plain({"weights": str(root / "head.safetensors"), "model": str(clip), **model}, pictures),
        "hpsv2": plain({"model": str(root / "hps"), "processor": str(processor), **model}, pictures),
        "imagereward": plain({"model": str(root / "ir"), "tokenizer": str(tokenizer), "vision_heads": HEADS,
                              "text_heads": HEADS, "max_length": MAX_LEN, **model}, pictures),
        "remote": remote,
    }


def test_every_registered_reward_has_a_case(builders):
    assert set(builders) == set(available_rewards())


@pytest.mark.parametrize("name", sorted(available_rewards()))
def test_nan_and_inf_images_score_nan_and_the_others_as_alone(name, builders):
    with builders[name]() as (options, images, prompts):
        reward = make_reward(name, **options)
        images = images.clone()
        images[1, 0, 2, 3] = float("nan")
        images[2, 2, 0, 0] = float("inf")
        meta = [{} for _ in prompts]
        scores = reward(images, prompts, meta)
        keep = [0, 3, 4]
        alone = reward(images[keep], [prompts[i] for i in keep], None)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    assert scores[[1, 2]].isnan().all()
    assert torch.isfinite(alone).all() and torch.equal(scores[keep], alone), (scores, alone)
    assert math.isnan(meta[1]["rewards"][name]) and meta[0]["rewards"][name] == scores[0].item()


def test_a_reward_is_shown_only_the_finite_images(monkeypatch):
    shown = []

    def spy(**_):
        def reward(images, prompts, metadata):
            shown.append((images.clone(), list(prompts)))
            for m in metadata:
                m["seen"] = True
            return images.mean(dim=(1, 2, 3))

        return reward

    monkeypatch.setitem(REWARDS, "spy", spy)
    images = torch.rand(4, 3, 6, 6)
    images[0, 1, 1, 1] = float("-inf")
    images[2] = float("nan")
    meta = [{} for _ in range(4)]
    scores = make_reward("spy(norm=batch):2,jpeg_compressibility")(images, list("abcd"), meta)
    assert len(shown) == 1 and torch.equal(shown[0][0], images[[1, 3]]) and shown[0][1] == ["b", "d"]
    assert [m.get("seen", False) for m in meta] == [False, True, False, True]
    assert scores[[0, 2]].isnan().all() and torch.isfinite(scores[[1, 3]]).all()

    shown.clear()
    assert make_reward("spy")(torch.full((2, 3, 4, 4), float("nan")), ["a", "b"]).isnan().all()
    assert shown == []  # nothing finite: the reward is not called at all


def test_the_rule_and_its_errors():
    images = torch.zeros(3, 3, 2, 2)
    images[1, 0, 0, 0] = float("inf")
    assert finite_images(images).tolist() == [True, False, True]
    got = score_finite(lambda x, p, m: torch.arange(len(p)).float(), images, ["a", "b", "c"])
    assert got[0] == 0 and math.isnan(got[1]) and got[2] == 1
    with pytest.raises(TempflowError, match="returned 3 scores for 2 images"):
        score_finite(lambda x, p, m: torch.zeros(3), images, ["a", "b", "c"])
    with pytest.raises(TempflowError, match="3 images, 2 prompts and 2 metadata dicts"):
        make_reward("jpeg_compressibility")(images, ["a", "b"])
