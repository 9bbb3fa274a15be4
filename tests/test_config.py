"""Config: YAML + dotted overrides; a mistake is one clear line naming the field, exit code 2."""

import pytest

from mmtune.cli import main
from mmtune.config import load_config, parse_overrides, save_config
from mmtune.errors import ConfigError


def test_both_override_forms_and_yaml_typing():
    got = parse_overrides(["train.lr=1e-4", "--data.batch_size", "16", "--options.class_aware=true"])
    assert got == {"train.lr": 1e-4, "data.batch_size": 16, "options.class_aware": True}
    cfg = load_config(None, got)
    assert cfg.train.lr == 1e-4 and cfg.data.batch_size == 16 and cfg.options["class_aware"] is True


def test_yaml_then_overrides_win(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.5\n  epochs: 3\nname: fromfile\n")
    cfg = load_config(p, {"train.lr": 0.25})
    assert (cfg.train.lr, cfg.train.epochs, cfg.name) == (0.25, 3, "fromfile")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"train.lrr": 1}, "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        ({"trian.lr": 1}, "unknown config key 'trian"),
        ({"train.lr": "fast"}, "config key 'train.lr'"),
        ({"data.batch_size": 0}, "config key 'data.batch_size': Input should be greater than 0"),
        ({"train.precision": "fp8"}, "config key 'train.precision'"),
        ({"data.on_bad_sample": "ignore"}, "config key 'data.on_bad_sample'"),
    ],
)
def test_mistakes_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_misspelt_key_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.batch_sise'"):
        load_config(p)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_exits_2_with_one_line_before_any_work(tmp_path, capsys):
    code = main(["train", f"output_dir={tmp_path}", "train.lrr=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "mmtune: error: unknown config key 'train.lrr' (did you mean 'train.lr'?)"
    assert not any(tmp_path.iterdir())  # nothing was started


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, {"train.lr": 3e-4, "model.freeze": ["vision.*"]})
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "old,new",
    [
        ("train.loss", "options.loss"),
        ("eval.zeroshot", "options.zeroshot"),
        ("data.twins", "options.twins"),
        ("train.tensorboard", "train.report_to"),
    ],
)
def test_moved_keys_say_where_they_went(old, new):
    with pytest.raises(ConfigError) as e:
        load_config(None, {old: True})
    assert f"'{old}' has moved" in str(e.value) and new in str(e.value) and "\n" not in str(e.value)
