import pytest

from tempflow.config import load_config
from tempflow.errors import ConfigError
from tempflow.worlds.shapes.pretrain import PretrainConfig


def test_preset_and_overrides():
    cfg = load_config(PretrainConfig, "configs/shapes/pretrain.yaml", ["model.width=64", "optim.lr=2e-3"])
    assert cfg.model.width == 64 and cfg.optim.lr == 2e-3
    assert isinstance(cfg, PretrainConfig)


PRETRAIN, TRAIN = "configs/shapes/pretrain.yaml", "configs/shapes/tempflow.yaml"


@pytest.mark.parametrize(
    "overrides,message,preset",
    [
        (["model.widht=3"], "unknown config key 'model.widht'.*allowed under 'model'.*width", PRETRAIN),
        (["nope=1"], "unknown config key 'nope'", PRETRAIN),
        (["model.width=abc"], "bad value for config key 'model.width'", PRETRAIN),
        (["optim.lr=-1"], "optim.lr must be > 0", PRETRAIN),
        (["optim.batch_size=0"], "batch_size must be >= 1", PRETRAIN),
        (["model.width=130"], "multiple of model.heads", PRETRAIN),
        (["data.categories=[dogs]"], "unknown", PRETRAIN),
        (["model.width"], "must look like key.sub=value", PRETRAIN),
        (["optim.lr=inf"], "'optim.lr' must be a finite number, got inf", PRETRAIN),
        (["optim.grad_clip=nan"], "'optim.grad_clip' must be a finite number, got nan", PRETRAIN),
        (["optim.weight_decay=-0.1"], "optim.weight_decay must be >= 0", PRETRAIN),
        (["threads=-1"], "threads must be >= 0", PRETRAIN),
        (["optim.lr=inf"], "'optim.lr' must be a finite number, got inf", TRAIN),
        (["optim.lr=-inf"], "'optim.lr' must be a finite number, got -inf", TRAIN),
        (["algorithm.noise_level=nan"], "'algorithm.noise_level' must be a finite number, got nan", TRAIN),
        (["algorithm.clip_range=.inf"], "'algorithm.clip_range' must be a finite number, got inf", TRAIN),
        (["optim.beta1=1.0"], r"optim.beta1 and optim.beta2 must be in \[0, 1\)", TRAIN),
        (["optim.beta2=-0.5"], r"optim.beta1 and optim.beta2 must be in \[0, 1\)", TRAIN),
        (["optim.weight_decay=-1e-4"], "optim.weight_decay must be >= 0", TRAIN),
        (["rollout.noise_level=inf"], "'rollout.noise_level'.*it is now algorithm.noise_level", TRAIN),
        (["algorithm.noise_level=inf"], "'algorithm.noise_level' must be a finite number, got inf", TRAIN),
        (["guard.max_bad_steps=0"], "guard.max_bad_steps must be >= 1", TRAIN),
        (["guard.nonfinite_iterations=0"], "guard.nonfinite_iterations must be >= 1", TRAIN),
        (["guard.spike=1"], r"guard.spike must be > 1 \(0: off\)", TRAIN),
        (["threads=-2"], "threads must be >= 0", TRAIN),
    ],
)
def test_bad_values_fail_with_a_clear_message(overrides, message, preset):
    from tempflow.training.config import TrainConfig

    schema = PretrainConfig if preset == PRETRAIN else TrainConfig
    with pytest.raises(ConfigError, match=message):
        load_config(schema, preset, overrides)


def test_a_non_finite_number_inside_a_list_is_named():
    from tempflow.config import _first_non_finite

    assert _first_non_finite({"a": {"b": [1.0, 2.0], "c": "inf", "d": 3}}) is None
    assert _first_non_finite({"a": {"b": [1.0, float("nan")]}})[0] == "a.b[1]"
    assert _first_non_finite({"x": 1.0, "y": {"z": float("-inf")}}) == ("y.z", float("-inf"))
    assert load_config(PretrainConfig, "configs/shapes/pretrain.yaml", ["optim.lr=2e-3"]).optim.lr == 2e-3


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


def test_presets_extend_each_other():
    from tempflow.training.config import TrainConfig

    full = load_config(TrainConfig, "configs/shapes/tempflow.yaml")
    branching = load_config(TrainConfig, "configs/shapes/ablation_branching.yaml")
    weighting = load_config(TrainConfig, "configs/shapes/ablation_weighting.yaml")
    baseline = load_config(TrainConfig, "configs/shapes/flow_grpo.yaml")
    assert (full.advantage.group_by, full.algorithm.noise_weighting) == ("seed_step", True)
    assert (branching.advantage.group_by, branching.algorithm.noise_weighting) == ("prompt_step", False)
    assert (weighting.advantage.group_by, weighting.algorithm.noise_weighting) == ("prompt_step", True)
    assert branching.rollout == full.rollout == weighting.rollout
    assert baseline.algorithm.name == "flow_grpo" and not baseline.algorithm.noise_weighting


def test_cheaper_branching_presets_change_one_switch():
    from dataclasses import asdict

    from tempflow.training.config import TrainConfig

    full = asdict(load_config(TrainConfig, "configs/shapes/tempflow.yaml"))
    changed = {"branch_all": ("branch_sample", 0), "branch_variance": ("branch_select", "variance"),
               "branch_coarse": ("completion_steps", 3)}
    for name, (key, value) in changed.items():
        cfg = asdict(load_config(TrainConfig, f"configs/shapes/{name}.yaml"))
        assert cfg["algorithm"][key] == value != full["algorithm"][key]
        assert {k: v for k, v in cfg["algorithm"].items() if k != key} == \
            {k: v for k, v in full["algorithm"].items() if k != key}
        assert {k: v for k, v in cfg.items() if k != "algorithm"} == \
            {k: v for k, v in full.items() if k != "algorithm"}


def test_extends_cycle_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(PretrainConfig, tmp_path / "a.yaml")


def test_unquoted_no_is_a_precision_not_a_boolean():
    from tempflow.training.config import TrainConfig

    for value in ("no", "off", '"no"'):  # YAML reads an unquoted no / off as false
        cfg = load_config(TrainConfig, "configs/shapes/tempflow.yaml", [f"optim.mixed_precision={value}"])
        assert cfg.optim.mixed_precision == "no"
    with pytest.raises(ConfigError, match="optim.mixed_precision must be one of"):
        load_config(TrainConfig, "configs/shapes/tempflow.yaml", ["optim.mixed_precision=true"])
