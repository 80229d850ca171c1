"""The shipped YAML configs (configs/): each loads into its command's dataclass with the values its comments promise,
passes that command's checks, and the DART pair (tllib's MDD, then the authors' step 2) runs end to end through the
command line on the embedded digits."""

from pathlib import Path

import pytest
import torch

from urda_fast.cli import main
from urda_fast.config import load_config
from urda_fast.dart import PretrainConfig, RobustifyConfig
from urda_fast.dart.config import check_pretrain_config, check_robustify_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
COMMANDS = {"dart-pretrain": (PretrainConfig, check_pretrain_config),
            "dart-robustify": (RobustifyConfig, check_robustify_config)}


def _command(path: Path):
    return next(value for prefix, value in COMMANDS.items() if path.name.startswith(prefix))


def test_every_shipped_config_is_for_a_known_command():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert files and all(any(f.name.startswith(p) for p in COMMANDS) for f in files), files


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_pass_their_checks(path):
    cls, check = _command(path)
    check(load_config(cls, str(path)))


def test_the_configs_hold_the_references_values():
    mdd = load_config(PretrainConfig, str(CONFIGS / "dart-pretrain-mdd-tllib.yaml"))
    assert (mdd.method, mdd.classifier, mdd.bottleneck_dim) == ("mdd", "mdd", 1024)
    assert (mdd.lr, mdd.lr_gamma, mdd.weight_decay, mdd.batch_size) == (0.004, 0.0002, 0.0005, 32)  # tllib's mdd.py
    dart = load_config(RobustifyConfig, str(CONFIGS / "dart-robustify-authors.yaml"))
    assert (dart.attack_space, dart.attack_eps, dart.attack_alpha, dart.attack_steps) == ("code", 0.1, 0.05, 10)
    assert not dart.attack_random_start and (dart.weighting, dart.student_init) == ("code", "backbone")
    assert (dart.lr, dart.batch_size, dart.iterations, dart.kl_weight) == (0.005, 18, 10000, 0.1)  # DART.py


def test_the_dart_pair_runs_from_the_command_line(tmp_path, capsys):
    short = ["--data", "digits", "--iterations", "2", "--eval-every", "2", "--batch-size", "16", "--progress",
             "false", "--tensorboard", "false", "--device", "cpu"]
    assert main(["dart", "pretrain", "--config", str(CONFIGS / "dart-pretrain-mdd-tllib.yaml"), "--bottleneck-dim",
                 "32", "--out", str(tmp_path / "mdd")] + short) == 0
    assert main(["dart", "robustify", "--config", str(CONFIGS / "dart-robustify-authors.yaml"), "--teacher",
                 str(tmp_path / "mdd"), "--attack-steps", "2", "--out", str(tmp_path / "dart")] + short[2:]) == 0
    saved = torch.load(tmp_path / "dart" / "best.pt", weights_only=False)
    assert saved["spec"]["layout"] == "mdd" and saved["config"]["attack_space"] == "code"
    assert saved["config"]["weighting"] == "code" and saved["config"]["student_init"] == "backbone"
