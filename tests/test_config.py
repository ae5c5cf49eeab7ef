"""Configs: the built-in recipes carry the paper's numbers; mistakes are errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from scanclust.config import Config, ConfigError, builtin_configs, load_config


@pytest.mark.parametrize("name", builtin_configs())
def test_builtin_config_loads(name: str) -> None:
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert cfg.name == name


def test_builtin_configs_include_paper_datasets() -> None:
    assert {"cifar10", "cifar20", "stl10", "imagenet", "imagenet_50", "imagenet_100",
            "imagenet_200"} <= set(builtin_configs())


def test_cifar10_carries_paper_numbers() -> None:
    cfg = load_config("cifar10")
    pre = cfg.pretext
    assert (pre.method, pre.epochs, pre.batch_size, pre.temperature) == ("simclr", 500, 512, 0.1)
    assert (pre.optim.name, pre.optim.lr, pre.optim.momentum, pre.optim.weight_decay) == (
        "sgd", 0.4, 0.9, 1e-4)
    assert (pre.optim.schedule, pre.optim.final_lr_factor) == ("cosine", 1e-3)
    scan = cfg.scan
    assert (scan.optim.name, scan.optim.lr, scan.optim.weight_decay) == ("adam", 1e-4, 1e-4)
    assert (scan.batch_size, scan.entropy_weight, scan.num_heads) == (128, 5.0, 1)
    sl = cfg.selflabel
    assert (sl.threshold, sl.batch_size, sl.epochs, sl.class_balance) == (0.99, 1000, 200, True)
    assert cfg.mine.topk == 20
    assert (cfg.augment.strong.cutout, cfg.augment.strong.num_ops) == (16, 4)
    assert cfg.model.backbone == "resnet18_cifar"


def test_imagenet_50_carries_paper_numbers() -> None:
    cfg = load_config("imagenet_50")
    assert cfg.model.backbone == "resnet50"
    assert cfg.scan.num_heads == 10
    assert (cfg.scan.optim.name, cfg.scan.optim.lr) == ("sgd", 5.0)
    assert cfg.mine.topk == 50
    assert cfg.scan.update_backbone is False
    assert cfg.selflabel.ema == 0.999


def test_imagenet_carries_paper_numbers() -> None:
    cfg = load_config("imagenet")
    assert (cfg.scan.batch_size, cfg.scan.optim.lr, cfg.mine.topk) == (4096, 30.0, 20)


def test_unknown_key_names_dotted_key_and_suggests() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("cifar10", ["scan.epochz=3"])
    assert "'scan.epochz'" in str(err.value)
    assert "'scan.epochs'" in str(err.value)


def test_unknown_section_is_an_error() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, {"scna.epochs": 3})
    assert "'scna'" in str(err.value)
    assert "'scan'" in str(err.value)


def test_unknown_key_in_yaml_file_names_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("scan:\n  epochs: 3\n  entropy_weigth: 2.0\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "'scan.entropy_weigth'" in message
    assert "'scan.entropy_weight'" in message
    assert str(path) in message


def test_wrong_type_names_key() -> None:
    with pytest.raises(ConfigError, match=r"'scan\.epochs'.*'abc'"):
        load_config("cifar10", ["scan.epochs=abc"])


def test_bad_choice_names_key() -> None:
    with pytest.raises(ConfigError, match=r"'model\.backbone'"):
        load_config("cifar10", ["model.backbone=resnet19"])


def test_overrides_parse_yaml_values() -> None:
    cfg = load_config("cifar10", ["scan.epochs=7", "scan.optim.lr=1e-4", "selflabel.ema=0.99",
                                  "data.mean=[0.5, 0.5, 0.5]", "scan.num_neighbors=null",
                                  "selflabel.ema=null", "model.num_clusters=20",
                                  "augment.strong.ops=[identity, rotate]",
                                  "augment.strong.num_ops=2"])
    assert cfg.scan.epochs == 7 and isinstance(cfg.scan.epochs, int)
    assert cfg.scan.optim.lr == 1e-4 and isinstance(cfg.scan.optim.lr, float)
    assert cfg.data.mean == [0.5, 0.5, 0.5]
    assert cfg.scan.num_neighbors is None
    assert cfg.selflabel.ema is None  # the later override wins
    assert cfg.model.num_clusters == 20
    assert cfg.augment.strong.ops == ["identity", "rotate"]


def test_dict_overrides_win_over_file() -> None:
    cfg = load_config("cifar10", {"scan.batch_size": 16, "seed": 3})
    assert (cfg.scan.batch_size, cfg.seed) == (16, 3)


def test_override_without_equals_is_error() -> None:
    with pytest.raises(ConfigError, match="scan.epochs"):
        load_config("cifar10", ["scan.epochs"])


@pytest.mark.parametrize("source", ["no_such_config", "missing/dir/config.yaml"])
def test_missing_config_names_it(source: str) -> None:
    with pytest.raises(ConfigError, match=source):
        load_config(source)


def test_override_errors_name_the_overrides_not_the_file() -> None:
    for overrides, key in ((["scan.epochz=3"], "scan.epochz"), (["scan.epochs=abc"], "scan.epochs"),
                           (["scan=3"], "scan")):
        with pytest.raises(ConfigError) as err:
            load_config("demo", overrides)
        assert f"'{key}' in the overrides" in str(err.value)
        assert "demo.yaml" not in str(err.value)


def test_wrong_type_in_the_file_still_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("scan:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=f"'scan.epochs' in {path}"):
        load_config(path, ["scan.batch_size=8"])


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_outside_what_every_generator_accepts_is_an_error(seed: int) -> None:
    """scikit-learn's k-means takes seeds in 0 .. 2**32 - 1; catch it before training."""
    with pytest.raises(ConfigError, match=r"config key 'seed' in the overrides: .* outside "
                                          r"0 .. 2\*\*32 - 1"):
        load_config("demo", [f"seed={seed}"])
    assert load_config("demo", [f"seed={2**32 - 1}"]).seed == 2**32 - 1


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400"])
def test_non_finite_numbers_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="'scan.optim.lr' in the overrides: expected a finite "
                                          "float"):
        load_config("demo", [f"scan.optim.lr={value}"])


def test_zero_std_is_refused() -> None:
    with pytest.raises(ConfigError, match="'data.std' in the overrides: must be positive"):
        load_config("demo", ["data.std=[0.5, 0, 0.5]"])


def test_weights_file_without_the_weights_method_is_an_error() -> None:
    with pytest.raises(ConfigError, match="'pretext.weights' in the overrides: is set, but "
                                           "pretext.method=simclr"):
        load_config("cifar10", ["pretext.weights=moco.pth"])
    assert load_config("cifar10", ["pretext.weights=moco.pth",
                                   "pretext.method=weights"]).pretext.weights == "moco.pth"


@pytest.mark.parametrize("name", builtin_configs())
def test_builtin_configs_take_the_cluster_count_from_the_data(name: str) -> None:
    """A recipe's class count must not silently apply to a user's unlabelled folder."""
    assert load_config(name).model.num_clusters is None


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "\n\n"])
def test_an_empty_config_file_is_refused_not_the_cifar10_defaults(tmp_path: Path,
                                                                  text: str) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path} is empty (or only comments)")


def test_invalid_yaml_is_one_line_naming_the_file_and_the_place(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("scan:\n  epochs: 3\n bad: [1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: not valid YAML (line 3, column 2: expected <block end>, "
                              f"but found '<block mapping start>')")
    path.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="expected a mapping of section: settings at the top "
                                          "level, got list"):
        load_config(path)


def test_a_root_that_is_not_utf8_round_trips_and_a_latin1_file_is_an_error(
        tmp_path: Path) -> None:
    import os

    from scanclust.rundir import RunDir

    root = os.fsdecode(b"/data/caf\xe9")  # a folder name that is not UTF-8
    RunDir(tmp_path).write_text(tmp_path / "config.yaml", yaml.safe_dump(
        load_config(None, {"data.root": root}).to_dict(), sort_keys=False))  # as runs write it
    assert '"/data/caf\\uDCE9"' in (tmp_path / "config.yaml").read_text(encoding="ascii")
    assert load_config(tmp_path / "config.yaml").data.root == root
    (tmp_path / "latin1.yaml").write_bytes(b"data:\n  root: /data/caf\xe9\n")  # by hand
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 0xe9 at "
                                          r"offset 23\); save it as UTF-8$"):
        load_config(tmp_path / "latin1.yaml")


def test_every_builtin_config_resolves_to_its_recorded_values() -> None:
    # tests/builtin_configs.json holds each built-in config as it resolved before the configs
    # were written as changes to a base: composing them must not move a single value.
    recorded = json.loads((Path(__file__).parent / "builtin_configs.json").read_text())
    assert sorted(recorded) == builtin_configs()
    for name, values in recorded.items():
        assert load_config(name).to_dict() == values, name


def test_a_config_file_composed_from_a_base(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text("base: demo\nscan: {epochs: 3}\n")
    (tmp_path / "more.yaml").write_text("base: mine.yaml\nscan: {num_heads: 2}\n")
    cfg = load_config(tmp_path / "more.yaml")
    assert (cfg.scan.epochs, cfg.scan.num_heads, cfg.data.dataset) == (3, 2, "digits")
    assert cfg.scan.batch_size == load_config("demo").scan.batch_size
    (tmp_path / "bad.yaml").write_text("base: more.yaml\nscan: {epoch: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'scan.epoch' in .*bad.yaml; did "
                                          r"you mean 'scan.epochs'\?"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "mine.yaml").write_text("base: more.yaml\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: 'base: more.yaml' leads back to itself"):
        load_config(tmp_path / "more.yaml")


@pytest.mark.parametrize("override, expected", [
    ("Scan.epochs=3", "unknown config key 'Scan' in the overrides; did you mean 'scan'?"),
    ("scan.epochz.x=3", "unknown config key 'scan.epochz' in the overrides; did you mean "
                        "'scan.epochs'?"),
    ("scan.epochs=-1", "config key 'scan.epochs' in the overrides: must be >= 0"),
    ("data.std=[0,0,0]", "config key 'data.std' in the overrides: must be positive (it divides)"),
    ("data.std=[1,2]", "config key 'data.std' in the overrides: needs three values (RGB)"),
    ("scan.optim.lr=abc", "config key 'scan.optim.lr' in the overrides: expected a finite "
                          "float, got 'abc'"),
    ("scan=3", "config key 'scan' in the overrides: expected a mapping, got 3"),
    ("augment.simclr.rotate=-5", "config key 'augment.simclr.rotate' in the overrides: must be "
                                 "between 0 and 180 degrees"),
    ("augment.simclr.shear=90", "config key 'augment.simclr.shear' in the overrides: must be at "
                                "least 0 and under 90 degrees"),
    ("augment.simclr.fill=256", "config key 'augment.simclr.fill' in the overrides: must be "
                                "0..255"),
])
def test_every_message_about_a_typed_value_names_the_overrides(override: str,
                                                              expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    assert str(err.value) == expected


def test_a_refused_file_value_names_the_file_and_a_default_names_nothing(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("scan:\n  epochs: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["scan.batch_size=8"])
    assert str(err.value) == f"config key 'scan.epochs' in {path}: must be >= 0"
    with pytest.raises(ConfigError) as err:  # typed method, default (unset) weights
        load_config(None, ["pretext.method=weights"])
    assert str(err.value) == ("config key 'pretext.weights': pretext.method=weights needs a "
                              "weights file")
