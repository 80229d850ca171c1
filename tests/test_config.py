"""Configs from YAML files and flags, and the loop's settings: bad values are errors that name them, before work."""

import re

import numpy as np
import pytest

from urda_fast.config import check_ranges, load_config, parse_float, repeated
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
        with pytest.raises(ValueError):
            parse_float(bad)


def test_a_bad_number_flag_names_itself_and_what_it_takes(capsys):
    from urda_fast.cli import main

    for argv, message in ((["dart", "pretrain", "--lr", "1/0"], "argument --lr: '1/0' is not a number or a fraction "
                                                               "such as 8/255 ('1/0' divides by zero)"),
                          (["dart", "robustify", "--attack-eps", "x"], "argument --attack-eps: 'x' is not a number"),
                          (["dart", "demo", "--scale", "1/0"], "argument --scale: must be a positive finite number")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("text, match", [
    ("iterations: 4\nbatch_sise: 8\n", r"unknown option\(s\) \['batch_sise'\] for PretrainConfig; valid: .*'batch_"),
    ("iterations: four\n", "iterations must be int, got 'four'"),
    ("iterations: 2.5\n", "iterations must be a whole number, got 2.5"),  # not silently 2
    ("vat: maybe\n", "vat must be true/false"),
    ("- 1\n- 2\n", "must hold a mapping of option: value"),
    ("iterations: [4\n", "is not valid YAML at line 2, column 1: expected ',' or ']'"),
    # values that only passed by a silent conversion
    ("1: 2\n", "has key 1, which is not an option name"),
    ("out:\n", "out has no value \\(an empty YAML key\\?\\)"),
    ("lr: null\n", "lr has no value"),
    ("iterations: true\n", "iterations must be a number, got True"),
    ("momentum: true\n", "momentum must be a number, got True"),
    ("vat: 2\n", "vat must be true/false, got 2"),
    ("data: [digits, office31]\n", "data must be a string, written as on the command line"),
    # PyYAML keeps the last of two equal keys without a word
    ("lr: 0.5\nmomentum: 0.8\nlr: 0.02\n", "at line 3, column 1: key 'lr' appears twice \\(first at line 1\\)"),
    ("vat-eps: 0.1\nvat_eps: 0.2\n", "sets vat_eps twice, as 'vat-eps' and as 'vat_eps'"),
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
    (dict(stop_after=-1), r"stop_after must be >= 1 \(or unset: never\), got -1"),  # was a run that did nothing
    (dict(resume=True, overwrite=True), "--resume continues .* --overwrite deletes it: give one of them"),
])
def test_loop_settings_reject_values_that_would_train_nothing_or_crash_later(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        LoopSettings(**{"iterations": 10, "out_dir": str(tmp_path), **change})
    LoopSettings(iterations=1, out_dir=str(tmp_path), save_every=0, amp="bf16")  # the edges themselves are fine


@pytest.mark.parametrize("check, match", [
    (lambda: check_ranges(Values(a=float("inf")), "t", positive=("a",)), "a must be finite, got inf"),
    (lambda: check_ranges(Values(a=float("-inf")), "t", non_negative=("a",)), "a must be >= 0, got -inf"),
    (lambda: check_ranges(Values(a=8.0), "t", pixel_budget=("a",)),
     r"a is an L-inf budget in \(0, 1\] pixel units .*got 8.0; did you mean 8/255\?"),
    (lambda: check_ranges(Values(a=float("inf")), "t", pixel_budget=("a",)), "pixel units"),
    (lambda: check_ranges(Values(a=float("nan")), "t", pixel_budget=("a",)), "pixel units"),
    (lambda: check_ranges(Values(a=0.0), "t", pixel_budget=("a",)), "pixel units"),
])
def test_ranges_refuse_infinities_and_budgets_given_in_levels(check, match):
    with pytest.raises(ValueError, match=match):
        check()
    check_ranges(Values(a=1.0, b=8 / 255, c=0.0), "t", positive=("a",), pixel_budget=("a", "b"), non_negative=("c",))


class Values:
    def __init__(self, **values):
        self.__dict__.update(values)


@pytest.mark.parametrize("argv, match", [
    (["dart", "robustify", "--teacher", "{missing}", "--attack-eps", "8"], "did you mean 8/255"),
    (["dart", "pretrain", "--vat", "--vat-eps", "inf"], "vat_eps is an L-inf budget in"),
    (["dart", "pretrain", "--batch-size", "1"], "batch_size must be >= 2 .*BatchNorm"),
    (["dart", "pretrain", "--bottleneck-dim", "-1"], "bottleneck_dim must be >= 0"),  # 0: no bottleneck (ERM)
    (["dart", "pretrain", "--trade-off", "inf"], "trade_off must be finite, got inf"),
    (["dart", "pretrain", "--stop-after", "-1"], "stop_after must be >= 0"),
    (["dart", "eval", "{missing}", "--eps", "8"], "eps is an L-inf budget .*did you mean 8/255"),
    (["hpt", "eval", "--target", "urda-tiny-vit:{missing}", "--eps", "4"], "did you mean 4/255"),
    (["hpt", "eval", "--target", "urda-tiny-vit:{missing}", "--max-batches", "-1"], "max_batches must be >= 0"),
    (["hpt", "proxy-check", "--target", "urda-tiny-vit:{missing}", "--proxy", "urda-tiny-rn:{missing}",
      "--steps", "0"], "steps must be > 0"),
    (["hpt", "train", "--target", "urda-tiny-vit:{missing}", "--proxy", "urda-tiny-rn:{missing}", "--eval-eps", "8"],
     "eval_eps is an L-inf budget"),
    (["hpt", "train", "--target", "urda-tiny-vit:{missing}", "--proxy", "urda-tiny-rn:{missing}", "--image-size",
      "0"], "image_size must be > 0"),
    (["hpt", "train", "--target", "urda-tiny-vit:{missing}", "--proxy", "urda-tiny-rn:{missing}", "--attack-alpha",
      "2"], "attack_alpha is an L-inf step size .*did you mean 2/255"),
    (["dart", "pretrain", "--vat", "--vat-alpha", "2"], "vat_alpha is an L-inf step size"),
    (["dart", "pretrain", "--vat", "--vat-steps", "0"], "vat_steps must be > 0"),  # the flag named, not `steps`
    (["dart", "robustify", "--teacher", "{missing}", "--attack-steps", "0"], "attack_steps must be > 0"),
    (["dart", "robustify", "--teacher", "{missing}", "--attack-alpha", "2"], "attack_alpha is an L-inf step size"),
    (["hpt", "eval", "--target", "urda-tiny-vit:{missing}", "--alpha", "1.5"], "alpha is an L-inf step size"),
    # choices the first training step or the model loading would check, after --overwrite removed the old run
    (["hpt", "train", "--target", "urda-tiny-vit:{missing}", "--proxy", "urda-tiny-rn:{missing}", "--method", "tecoa",
      "--kl-reduction", "mean"], "kl_reduction must be one of 'sum', 'batchmean', got 'mean'"),
    (["hpt", "train", "--target", "urda-tiny-vit:{missing}", "--proxy", "urda-tiny-rn:{missing}", "--logits",
      "raw"], "logits must be one of 'cosine', 'clip'"),
    (["hpt", "train", "--target", "urda-tiny-vit:{missing}", "--proxy", "urda-tiny-rn:{missing}", "--preprocess",
      "none"], "preprocess must be one of 'imagenet', 'clip'"),
    (["hpt", "train", "--target", "urda-tiny-vit:{missing}", "--method", "pmg-aft", "--pmg-kl-direction",
      "reverse"], "pmg_kl_direction must be one of 'paper', 'code', got 'reverse'"),
    (["hpt", "train", "--target", "urda-tiny-vit:{missing}", "--proxy", "urda-tiny-rn:{missing}", "--amp", "fp8"],
     "amp must be one of 'auto', 'none', 'bf16', 'fp16'"),
    (["hpt", "train", "--target", "urda-tiny-vit:{missing}", "--proxy", "urda-tiny-rn:{missing}", "--eval-every",
      "0"], "eval_every must be >= 1"),
    (["hpt", "demo", "--scale", "nan"], "argument --scale: must be a positive finite number"),
    (["dart", "demo", "--scale", "0"], "argument --scale: must be a positive finite number"),
    (["demo", "--repeats", "0"], "argument --repeats: must be >= 1"),
    (["dart", "eval", "{missing}", "--eps", "abc"], "argument --eps: 'abc' is not a comma-separated list"),
    (["dart", "eval", "{missing}", "--out", "{file}"], "--out .*afile' is a file; give a folder"),
    # a negative fraction reaches the budget check (argparse alone would take it for an option)
    (["dart", "eval", "{missing}", "--eps", "-8/255"], r"budgets must be positive .*got \(-0\.0313"),
    (["hpt", "eval", "--target", "urda-tiny-vit:{missing}", "--eps", "-1/255"], "eps must be"),
    (["dart", "robustify", "--teacher", "{missing}", "--attack-alpha", "-.5/255"], "attack_alpha"),
    (["hpt", "eval", "--target", "urda-tiny-vit:{missing}", "--out", "{file}"], "--out .*afile' is a file"),
    (["hpt", "eval", "--target", "urda-tiny-vit:{missing}", "--prompts", "paper"],
     "prompts must be one of 'code', 'template', got 'paper'"),
])
def test_the_command_line_names_bad_numbers_before_any_work(tmp_path, capsys, argv, match):
    """Checked before a model or a dataset is read (the paths given do not exist: reading them would fail first)."""
    from urda_fast.cli import main

    (tmp_path / "afile").write_text("")
    argv = [a.format(missing=tmp_path / "missing.pt", file=tmp_path / "afile") for a in argv]
    with pytest.raises(SystemExit) as stop:
        main([*argv, *(["--out", str(tmp_path / "run")] if argv[1] in ("pretrain", "robustify", "train") else [])])
    assert re.search(match, f"{stop.value} {capsys.readouterr().err}"), (stop.value, match)


@pytest.mark.parametrize("check, cfg, match", [
    ("dart", dict(method="dann", margin=2.0), "--margin 2.0 has no effect in this run: it is MDD's margin"),
    ("dart", dict(method="source-only", trade_off=5.0), "source-only has no transfer loss"),
    ("dart", dict(vat_steps=3), "--vat-steps 3 has no effect .*need --vat"),
    ("dart", dict(vat=True, vat_threshold=0.5), "--vat-threshold 0.5 has no effect .*needs --vat-target"),
    ("hpt", dict(method="hpt", warmup_proxy_weight=0.5), "only hpt-gpd has a warm-up phase"),
    ("hpt", dict(method="hpt-gpd", pmg_clean_weight=3.0), "PMG-AFT's loss options need --method pmg-aft"),
    ("hpt", dict(method="tecoa", proxy_weight=5.0), "--proxy-weight 5.0 has no effect .*need --method hpt or hpt-gpd"),
    ("hpt", dict(method="pmg-aft", anchor_weight=1.0), "--anchor-weight 1.0 has no effect"),
])
def test_options_the_run_ignores_are_named(tmp_path, check, cfg, match):
    """A warning, not an error: one config is often run with a switch on and off (UDA with and without --vat)."""
    if check == "dart":
        from urda_fast.dart.config import check_pretrain_config as check_fn

        config = PretrainConfig(**cfg)
    else:
        from urda_fast.hpt import TrainConfig
        from urda_fast.hpt.train import check_config as check_fn

        config = TrainConfig(target="urda-tiny-vit:t.pt", proxy="urda-tiny-rn:p.pt", **cfg)
    with pytest.warns(UserWarning, match=match):
        check_fn(config)


@pytest.mark.parametrize("argv, match", [
    (["hpt", "eval", "--proxy", "urda-tiny-rn:p.pt", "--anchor", "urda-tiny-vit:a.pt"],
     "hpt eval: --proxy 'urda-tiny-rn:p.pt' has no effect .*the proxy and the anchor are training's"),
    (["hpt", "proxy-check", "--proxy", "urda-tiny-rn:{missing}", "--anchor", "urda-tiny-vit:a.pt"],
     "hpt proxy-check: --anchor 'urda-tiny-vit:a.pt' has no effect"),
])
def test_hpt_eval_and_proxy_check_name_the_training_options_they_ignore(tmp_path, argv, match):
    """They inherit the CLIP options of training: a --proxy or --anchor given to them is named before any work (which
    then stops here, on the dataset root or the missing target)."""
    from urda_fast.cli import main

    target = ["--target", f"urda-tiny-vit:{tmp_path / 'missing.pt'}"]
    argv = [a.format(missing=tmp_path / "missing.pt") for a in argv]
    with pytest.warns(UserWarning, match=match), pytest.raises(SystemExit, match="needs --root|missing.pt"):
        main([*argv, *target])


@pytest.mark.parametrize("command", ["dart pretrain", "dart robustify", "dart eval", "dart demo", "dart summary",
                                     "hpt train", "hpt eval", "hpt proxy-check", "hpt demo", "profile dart",
                                     "bench report", "demo", "info"])
def test_every_commands_help_prints(command, capsys):
    """argparse %-formats help text: a field comment with a bare % ("2-5% over") made `hpt train --help` raise."""
    from urda_fast.cli import main

    with pytest.raises(SystemExit) as stop:
        main([*command.split(), "--help"])
    assert stop.value.code == 0 and "usage: " in capsys.readouterr().out


def test_flag_help_takes_a_comment_that_goes_on_below_or_stands_above_the_field(capsys):
    """--cudnn-benchmark's comment ran on to the next line (its help stopped at "(GPU; off: the same"); the comment
    above --fold-batchnorm is its only one (its help showed the bare default)."""
    from urda_fast.cli import main

    with pytest.raises(SystemExit):
        main(["dart", "pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the same algorithms in every process, one condition of a bit-for-bit resume on a GPU) --resume" in text
    assert '(default: auto); Attacks run on the model with each conv/linear -> BatchNorm pair folded' in text
    assert '"auto": when torch.fx can trace the model | "on" | "off". --nvtx' in text


def test_flag_help_shows_each_fields_comment_and_budgets_in_levels(capsys):
    """The comment on a config field's line says what its values mean: `--help` shows it beside the default, and
    a budget that is a whole number of levels reads 2/255, not 0.00784313725490196."""
    from urda_fast.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["hpt", "train", "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert '--method METHOD (default: hpt-gpd); "tecoa" | "pmg-aft" | "hpt"' in text
    assert "--attack-eps ATTACK_EPS (default: 2/255)" in text
    # no comment on momentum's line: its default alone
    assert "(default: 5e-05); peak lr of the HPT phase --momentum MOMENTUM (default: 0.9) --weight-decay" in text


def test_repeated_lists_each_name_given_more_than_once_sorted():
    assert repeated(["dann", "cdan", "dann", "mdd", "cdan", "dann"]) == ["cdan", "dann"]
    assert repeated(["a", "b"]) == [] and repeated([]) == []


def test_configs_built_in_python_get_their_types_checked():
    """Flags and YAML values are converted; a config built in Python is not: a string budget or a fractional count
    is a TypeError naming the field, not one from inside a comparison later."""
    from urda_fast.dart.config import RobustifyConfig

    for change, match in ((dict(attack_eps="8/255"), r"attack_eps must be float, got '8/255' \(str\) \(in Python"),
                          (dict(iterations=4.5), r"iterations must be int, got 4.5 \(float\)"),
                          (dict(progress=1), r"progress must be bool, got 1 \(int\)"),
                          (dict(batch_size=True), r"batch_size must be int, got True \(bool\)")):
        with pytest.raises(TypeError, match=match):
            check_ranges(RobustifyConfig(**change), "dart")
    check_ranges(RobustifyConfig(lr=1, iterations=np.int64(3), attack_eps=np.float32(0.1)), "dart")  # numbers
