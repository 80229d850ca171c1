"""Configs from YAML files and flags, and the loop's settings: bad values are errors that name them, before work."""

import pytest

from urda_fast.config import load_config, parse_float
from urda_fast.dart.config import PretrainConfig
from urda_fast.train import LoopSettings


def test_yaml_then_flags_override_the_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("iterations: 40\nbatch-size: 8\nvat: yes\nvat_eps: 8/255\n")
    cfg = load_config(PretrainConfig, str(path), {"iterations": 50, "lr": None})
    assert load_config(PretrainConfig, None, {"iterations": 3.0}).iterations == 3  # a whole float is fine
    assert (cfg.iterations, cfg.batch_size, cfg.vat, cfg.lr) == (50, 8, True, PretrainConfig().lr)
    assert cfg.vat_eps == pytest.approx(8 / 255) == parse_float("8/255")
    for bad in ("1/0", "1/x", "eight"):
        with pytest.raises(ValueError):  # argparse turns a ValueError into "invalid parse_float value"
            parse_float(bad)


@pytest.mark.parametrize("text, match", [
    ("iterations: 4\nbatch_sise: 8\n", r"unknown option\(s\) \['batch_sise'\] for PretrainConfig; valid: .*'batch_"),
    ("iterations: four\n", "iterations must be int, got 'four'"),
    ("iterations: 2.5\n", "iterations must be a whole number, got 2.5"),  # not silently 2
    ("vat: maybe\n", "vat must be true/false"),
    ("- 1\n- 2\n", "must hold a mapping of option: value"),
    ("iterations: [4\n", "is not valid YAML at line 2, column 1: expected ',' or ']'"),
])
def test_bad_yaml_files_name_the_problem(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(PretrainConfig, str(path))


def test_missing_yaml_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml' does not exist"):
        load_config(PretrainConfig, "nope.yaml")


@pytest.mark.parametrize("change, match", [
    (dict(iterations=0), "iterations must be >= 1, got 0"),
    (dict(iterations=-3), "iterations must be >= 1, got -3"),
    (dict(eval_every=0), "eval_every must be >= 1"),  # the loop evaluates when iteration % eval_every == 0
    (dict(save_every=-1), "save_every must be >= 0"),
    (dict(log_every=0), "log_every must be >= 1"),
    (dict(amp="fp8"), r"amp must be one of \('none', 'bf16', 'fp16'\), got 'fp8'"),
])
def test_loop_settings_reject_values_that_would_train_nothing_or_crash_later(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        LoopSettings(**{"iterations": 10, "out_dir": str(tmp_path), **change})
    LoopSettings(iterations=1, out_dir=str(tmp_path), save_every=0, amp="bf16")  # the edges themselves are fine
