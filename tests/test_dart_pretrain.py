"""DART step 1 (UDA pre-training, UDA+VAT) and the `urda-fast dart` commands, end to end on the embedded digits."""

import importlib
import json
import os

import pytest
import torch

from urda_fast.cli import main
from urda_fast.dart import PretrainConfig, pretrain
from urda_fast.dart.common import load_checkpoint_model


def _cfg(out, **kw):
    options = dict(data="digits", out=str(out), iterations=4, batch_size=16, eval_every=2, bottleneck_dim=32,
                   progress=False, vat_steps=2, vat_eps=0.1, vat_alpha=0.05)
    return PretrainConfig(**{**options, **kw})


@pytest.mark.parametrize("method, options", [("source-only", {}), ("dann", {}), ("cdan", {"entropy_conditioning": True}),
                                             ("mdd", {"margin": 2.0}), ("dann", {"vat": True}),
                                             ("source-only", {"vat": True, "vat_target": True, "vat_threshold": 0.0})])
def test_every_method_trains_and_saves_a_loadable_classifier(tmp_path, method, options):
    result = pretrain(_cfg(tmp_path, method=method, **options))
    assert 0 <= result["best"]["clean_acc"] <= 100
    model, spec, _ = load_checkpoint_model(str(tmp_path))
    assert spec.num_classes == 10 and not model.training
    logits = model(torch.rand(3, 1, 16, 16))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    header, *rows = (tmp_path / "log.csv").read_text().splitlines()
    assert "loss" in header and len(rows) >= 1
    if options.get("vat_target"):
        assert "pseudo_loss" in header


def test_pretraining_learns_the_source_task(tmp_path):
    """Not a smoke test: 150 source-only steps must beat chance (10%) on the handwritten target by a wide margin."""
    result = pretrain(_cfg(tmp_path, method="source-only", iterations=150, eval_every=150, batch_size=32))
    assert result["last"]["clean_acc"] > 40


def test_dann_resumes_bit_for_bit(tmp_path):
    """The GRL's warm-start counter, the discriminator and the optimizer all come back: same final weights."""
    pretrain(_cfg(tmp_path / "full", iterations=6))
    pretrain(_cfg(tmp_path / "killed", iterations=6, stop_after=3))
    # resuming with other training settings would continue as another run: refused, the checkpoint left as it was
    with pytest.raises(ValueError, match=r"written with other settings \(batch_size 16 -> 8, lr 0.01 -> 0.02\)"):
        pretrain(_cfg(tmp_path / "killed", iterations=6, resume=True, lr=0.02, batch_size=8))
    pretrain(_cfg(tmp_path / "killed", iterations=6, resume=True, progress=True, eval_every=3))  # reporting may
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["modules"]["method"]
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=False)["modules"]["method"]
    assert a.keys() == b.keys() and any("iter_num" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("change, error, match", [
    (dict(method="dan"), ValueError, "unknown UDA method"),
    (dict(data="office32"), ValueError, "unknown --data"),
    (dict(data="office31"), ValueError, "needs --root"),
    (dict(data="office31", root="/nonexistent", source="A", target="W"), FileNotFoundError, "/nonexistent"),
    (dict(batch_size=5000), ValueError, "cannot fill a batch"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1, got 0"),
    (dict(trade_off=-1.0), ValueError, "trade_off must be >= 0, got -1.0"),
    (dict(iterations=-3), ValueError, "iterations must be >= 1, got -3"),
    # flags meant for a benchmark from files must not fall back to the embedded digits silently
    (dict(source="MNIST", target="USPS"), ValueError, "embedded printed -> handwritten.*-s 'MNIST', -t 'USPS'.*"
                                                      "digits-files"),
    (dict(root="/data"), ValueError, "takes no --root '/data'"),
])
def test_pretrain_rejects_bad_configs(tmp_path, change, error, match):
    with pytest.raises(error, match=match):
        pretrain(_cfg(tmp_path, **change))


def test_cli_pretrain_robustify_eval(tmp_path, capsys):
    """The documented command chain, through the CLI's flags and a YAML file."""
    (tmp_path / "pretrain.yaml").write_text("method: dann\niterations: 4\nbatch_size: 16\nbottleneck_dim: 32\n")
    common = ["--data", "digits", "--eval-every", "2", "--progress", "false"]
    assert main(["dart", "pretrain", "--config", str(tmp_path / "pretrain.yaml"), "--out", str(tmp_path / "uda"),
                 *common]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["clean_acc"] >= 0
    saved = torch.load(tmp_path / "uda" / "best.pt", weights_only=False)
    assert saved["config"]["method"] == "dann" and saved["config"]["iterations"] == 4
    assert main(["dart", "robustify", "--teacher", str(tmp_path / "uda" / "best.pt"), "--out", str(tmp_path / "dart"),
                 "--iterations", "3", "--batch-size", "8", "--attack-steps", "2", *common]) == 0
    capsys.readouterr()
    assert main(["dart", "eval", str(tmp_path / "uda"), str(tmp_path / "dart"), "--attacks", "clean,fgsm,pgd5",
                 "--eps", "0.1", "--out", str(tmp_path / "report"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(report["rows"]) == 2
    for row in report["rows"]:
        assert 0 <= row["pgd"] <= row["clean"] <= 100
    assert os.path.isfile(tmp_path / "report" / "report.md")


def test_cli_demo_writes_the_report(tmp_path, capsys):
    assert main(["dart", "demo", "--out", str(tmp_path), "--scale", "0.004", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [row["method"] for row in report["rows"]] == ["source-only", "uda", "uda+vat", "dart"]
    for row in report["rows"]:
        assert {"clean", "fgsm", "pgd"} <= row.keys()
    assert (tmp_path / "report.md").is_file() and any(p.suffix == ".png" for p in tmp_path.iterdir())


def test_cli_demo_seed_reaches_every_run(tmp_path, monkeypatch):
    demo_module = importlib.import_module("urda_fast.dart.demo")  # the package's `demo` is the function
    seen = []
    monkeypatch.setattr(demo_module, "pretrain", seen.append)
    monkeypatch.setattr(demo_module, "robustify", seen.append)
    monkeypatch.setattr(demo_module, "evaluate_runs", lambda *a, **k: {"rows": [], "data": "digits"})
    assert main(["dart", "demo", "--out", str(tmp_path), "--device", "cpu", "--seed", "3"]) == 0
    assert [cfg.seed for cfg in seen] == [3, 3, 3, 3]
