import pytest

from tempflow.config import PretrainConfig, load_config
from tempflow.errors import ConfigError


def test_preset_and_overrides():
    cfg = load_config(PretrainConfig, "configs/shapes/pretrain.yaml", ["model.width=64", "optim.lr=2e-3"])
    assert cfg.model.width == 64 and cfg.optim.lr == 2e-3
    assert isinstance(cfg, PretrainConfig)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.widht=3"], "unknown config key 'model.widht'.*allowed under 'model'.*width"),
        (["nope=1"], "unknown config key 'nope'"),
        (["model.width=abc"], "bad value for config key 'model.width'"),
        (["optim.lr=-1"], "optim.lr must be > 0"),
        (["optim.batch_size=0"], "batch_size must be >= 1"),
        (["model.width=130"], "multiple of model.heads"),
        (["data.categories=[dogs]"], "unknown"),
        (["model.width"], "must look like key.sub=value"),
    ],
)
def test_bad_values_fail_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, "configs/shapes/pretrain.yaml", overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depth: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PretrainConfig, bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(PretrainConfig, typo)
