"""Training against a reward server: identical to in-process scoring, and a server that goes down
mid-run stops the run cleanly with its work saved; resuming reproduces the uninterrupted run."""

import threading

import pytest

from run_files import metric_rows
from tempflow.config import load_config
from tempflow.errors import TempflowError
from tempflow.rewards.server import make_server
from tempflow.training.config import TrainConfig
from tempflow.training.run import train

TINY = ["iterations=4", "rollout.prompts_per_iter=2", "rollout.seeds_per_prompt=2", "algorithm.children=3",
        "rollout.num_steps=4", "algorithm.branch_sample=2", "eval.every=0", "lora.rank=4", "optim.minibatch=16",
        "checkpoint_every=10", "threads=1", "lora.enabled=true", "optim.mixed_precision=no"]


class Server:
    """The shapes reward behind HTTP on a fixed port; can stop after `limit` requests."""

    def __init__(self, port: int = 0, limit: int | None = None) -> None:
        from tempflow.rewards import make_reward

        shapes, self.calls, self.limit = make_reward("shapes"), 0, limit

        def reward(images, prompts, metadata):
            self.calls += 1
            return shapes(images, prompts, metadata)

        self.server = make_server(reward, port=port)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _cfg(model: str, url: str) -> TrainConfig:
    return load_config(TrainConfig, "configs/shapes/tempflow.yaml",
                       [f"model={model}", *TINY, f"reward=remote(url={url}, retries=1, backoff=0.05, timeout=5)"])


def _shapes_8bit(**_):
    """The shapes reward on images rounded to 8 bits, as they cross the wire."""
    from tempflow.rewards import make_reward

    shapes = make_reward("shapes")
    return lambda images, prompts, metadata: shapes(images.mul(255).round().div(255), prompts, metadata)


def test_remote_reward_training_matches_in_process(tiny_model_dir, tmp_path, monkeypatch):
    from tempflow import rewards

    srv = Server()
    try:
        train(_cfg(tiny_model_dir, srv.url), tmp_path / "remote")
    finally:
        srv.stop()
    monkeypatch.setitem(rewards.REWARDS, "shapes_8bit", _shapes_8bit)
    local = load_config(TrainConfig, "configs/shapes/tempflow.yaml",
                        [f"model={tiny_model_dir}", *TINY, "reward=shapes_8bit"])
    train(local, tmp_path / "local")
    assert srv.calls == 4
    remote_rows, local_rows = metric_rows(tmp_path / "remote"), metric_rows(tmp_path / "local")
    # images cross the wire as 8-bit PNG (lossless): the same scores as in-process scoring of 8-bit images
    # (a pixel on a colour boundary can flip with the rounding, so the reference rounds as well)
    assert [r["reward_mean"] for r in remote_rows] == pytest.approx([r["reward_mean"] for r in local_rows], abs=1e-6)


def test_server_down_mid_run_keeps_the_work_and_resumes_exactly(tiny_model_dir, tmp_path):
    srv = Server()
    port = srv.port
    ref = tmp_path / "ref"
    train(_cfg(tiny_model_dir, srv.url), ref)

    run = tmp_path / "cut"
    cfg = _cfg(tiny_model_dir, srv.url)
    calls = srv.calls

    # stop the server after two more iterations' requests: the third iteration cannot be scored
    orig = srv.server.reward

    def reward_then_stop(images, prompts, metadata):
        out = orig(images, prompts, metadata)
        if srv.calls - calls >= 2:
            threading.Thread(target=srv.stop, daemon=True).start()
        return out

    srv.server.reward = reward_then_stop
    with pytest.raises(TempflowError, match=r"saved at step 2.*--resume"):
        train(cfg, run)
    assert (run / "checkpoints").is_dir() and len(metric_rows(run)) == 2  # step 2 written although checkpoint_every=10

    again = Server(port=port)  # the server comes back on the same address
    try:
        train(load_config(TrainConfig, run / "config.yaml"), run, resume=True)
    finally:
        again.stop()
    assert metric_rows(run) == metric_rows(ref)
