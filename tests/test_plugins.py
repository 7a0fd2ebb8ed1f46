"""--import MODULE: the user's own rewards, registered by a module, used by train and serve-reward."""

from tempflow.cli import main
from tempflow.rewards import REWARDS

PLUGIN = '''
from tempflow.rewards import REWARDS

def make_brightness(target: float = 0.5):
    return lambda images, prompts, meta: -(images.mean(dim=(1, 2, 3)) - target).abs()

REWARDS["brightness"] = make_brightness
'''


def test_train_with_a_reward_from_an_imported_module(tmp_path, monkeypatch, tiny_model_dir, capsys):
    (tmp_path / "my_rewards.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(REWARDS, "brightness", raising=False)
    args = ["train", "--import", "my_rewards", "--out", str(tmp_path / "run"), "--set", f"model={tiny_model_dir}",
            "--set", "reward=brightness(target=0.4)", "--set", "iterations=1", "--set", "eval.every=0",
            "--set", "rollout.prompts_per_iter=2", "--set", "rollout.num_steps=4", "--set", "threads=1"]
    try:
        assert main(args) == 0
    finally:
        REWARDS.pop("brightness", None)
    assert (tmp_path / "run" / "final").is_dir()


def test_bad_import_is_one_line(capsys):
    assert main(["serve-reward", "--import", "no_such_module_xyz", "--reward", "shapes", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "cannot import --import module 'no_such_module_xyz'" in err and "Traceback" not in err
