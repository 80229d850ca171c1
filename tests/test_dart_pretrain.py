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
                                             ("cdan", {"randomized": True, "randomized_dim": 64}),
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
    assert spec.layout == ("mdd" if method == "mdd" else "standard")  # tllib's MDD classifier for MDD
    assert isinstance(model.head, torch.nn.Sequential) == (method == "mdd")
    if options.get("randomized"):  # the discriminator sees the randomized map's 64 columns, not 10 x 32
        weights = torch.load(tmp_path / "last.pt", weights_only=False)["modules"]
        assert any(v.shape == (32, 64) for v in weights["method"].values())


def test_vat_trains_the_uda_step_on_the_attacked_batches():
    """UDA+VAT: the UDA method's training step gets PGD's adversarial source batch (with the source labels) and,
    with vat_target, its adversarial target batch (attacked with the eval-mode pseudo-labels): not the clean batches,
    inside the eps ball and [0, 1], and exactly what the attack gives from the same random start; the pseudo-label
    term is the cross-entropy of the attacked target batch, not of the clean one."""
    import copy
    import itertools

    import torch.nn.functional as F

    from urda_fast.attacks import PGD
    from urda_fast.dart.common import attack_folding
    from urda_fast.dart.pretrain import UdaTask
    from urda_fast.models import ModelSpec
    from urda_fast.uda import create_method

    torch.manual_seed(0)
    x_s, y_s, x_t = torch.rand(8, 1, 16, 16), torch.randint(0, 10, (8,)), torch.rand(8, 1, 16, 16)
    eps = 0.1
    cfg = PretrainConfig(method="dann", vat=True, vat_target=True, vat_threshold=0.0, vat_steps=3, vat_eps=eps,
                         vat_alpha=0.05)
    method = create_method("dann", ModelSpec(backbone="digits_cnn", num_classes=10, bottleneck_dim=16).build())
    task = UdaTask(cfg, method, itertools.repeat((x_s.clone(), y_s.clone())),
                   itertools.repeat((x_t.clone(), torch.zeros(8, dtype=torch.long))), None)
    before = copy.deepcopy(method.model)  # the weights the attacks ran against (the step changes no weight)
    seen, step = [], task.step
    task.step = lambda *batches: seen.append([b.detach().clone() for b in batches]) or step(*batches)
    torch.manual_seed(1)
    out = task.training_step()
    assert len(seen) == 1
    got_s, got_y, got_t = seen[0]
    # the same attack from the same random start (the global RNG, consumed source first, then target)
    torch.manual_seed(1)
    attack = PGD(before, eps=eps, alpha=0.05, steps=3, fold_batchnorm=attack_folding(cfg))
    want_s = attack(x_s, y_s)
    with torch.no_grad():
        pseudo = before.eval()(x_t).argmax(1)
    before.train()
    want_t = attack(x_t, pseudo)
    assert torch.equal(got_y, y_s)
    for got, clean, want in ((got_s, x_s, want_s), (got_t, x_t, want_t)):
        assert (got - clean).abs().amax() > eps / 2  # attacked, not the clean batch
        assert (got - clean).abs().amax() <= eps + 1e-6 and got.min() >= 0 and got.max() <= 1
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # the pseudo-label loss (every sample kept at threshold 0): on the attacked target batch, train mode
    with torch.no_grad():
        on_attacked = F.cross_entropy(before(want_t), pseudo)
        on_clean = F.cross_entropy(before(x_t), pseudo)
    assert float(out["pseudo_kept"]) == 1.0
    torch.testing.assert_close(out["pseudo_loss"], on_attacked, rtol=1e-5, atol=1e-6)
    # the check tells the two batches apart: 1.6e-3 apart here, 70x the tolerance above
    assert abs(float(on_attacked) - float(on_clean)) > 3e-4
    out["loss"].backward()


def test_no_bottleneck_is_tllibs_erm_classifier_and_robustifies(tmp_path):
    """--bottleneck-dim 0: the head on the backbone's features, as tllib's ERM (source-only) Classifier; DART's feature
    term then distils the backbone's features. The MDD layout needs its bottleneck."""
    from urda_fast.dart import robustify
    from urda_fast.dart.config import RobustifyConfig

    pretrain(_cfg(tmp_path / "erm", method="source-only", bottleneck_dim=0, iterations=2, eval_every=2))
    state = torch.load(tmp_path / "erm" / "best.pt", weights_only=False)
    assert state["spec"]["bottleneck_dim"] == 0
    assert not any("bottleneck" in k and v.dim() > 1 for k, v in state["modules"]["method"].items())
    robustify(RobustifyConfig(teacher=str(tmp_path / "erm" / "best.pt"), out=str(tmp_path / "dart"), iterations=2,
                              batch_size=8, eval_every=2, attack_steps=1, progress=False, device="cpu"))
    assert (tmp_path / "dart" / "best.pt").exists()
    with pytest.raises(ValueError, match="mdd classifier layout needs a bottleneck"):
        pretrain(_cfg(tmp_path / "mdd", method="mdd", bottleneck_dim=0))


def test_a_backbone_trained_from_scratch_gets_the_full_learning_rate(tmp_path):
    """tllib's --scratch: the 0.1x backbone rate is for pretrained weights, and the digits CNN has none."""
    cfg = _cfg(tmp_path, method="dann", iterations=1, eval_every=1)
    pretrain(cfg)
    groups = torch.load(tmp_path / "last.pt", weights_only=False)["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups[:3]] == pytest.approx([cfg.lr] * 3)


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
    (dict(batch_size=1), ValueError, r"batch_size must be >= 2 \(the bottleneck's BatchNorm"),
    (dict(trade_off=-1.0), ValueError, "trade_off must be >= 0, got -1.0"),
    (dict(iterations=-3), ValueError, "iterations must be >= 1, got -3"),
    # flags meant for a benchmark from files must not fall back to the embedded digits silently
    (dict(source="MNIST", target="USPS"), ValueError, "embedded printed -> handwritten.*-s 'MNIST', -t 'USPS'.*"
                                                      "digits-files"),
    (dict(root="/data"), ValueError, "takes no --root '/data'"),
    # options that had no effect, or a raw torch error deep inside
    (dict(arch="digits_cnn", backbone_weights="/nonexistent.pth"), ValueError,
     "digits_cnn backbone takes no pretrained weights .* '/nonexistent.pth'"),
    (dict(arch="resnet18", backbone_weights="/nonexistent.pth"), FileNotFoundError, "'/nonexistent.pth' not found"),
    (dict(vat_target=True), ValueError, "vat_target .* needs --vat"),
    (dict(vat=True, vat_threshold=2.0), ValueError, r"vat_threshold must be in \[0, 1\].*got 2.0"),
    (dict(vat=True, vat_threshold=-0.1), ValueError, r"vat_threshold must be in \[0, 1\]"),
    (dict(entropy_conditioning=True), ValueError, "entropy_conditioning is CDAN's option .* not 'dann'"),
    (dict(randomized=True), ValueError, "randomized is CDAN's option .*randomized multilinear map.* not 'dann'"),
    (dict(method="cdan", randomized=True, randomized_dim=0), ValueError, "randomized_dim must be > 0"),
    (dict(bottleneck_dim=-3), ValueError, "bottleneck_dim must be >= 0, got -3"),
    (dict(device="gpu"), ValueError, "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (dict(device="mps"), ValueError, r"got 'mps' \(urda_fast runs on CPUs and CUDA GPUs\)"),
    (dict(fold_batchnorm="yes"), ValueError, "fold_batchnorm must be one of"),
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


# ---------------------------------------------------------------------------------- runs on benchmark files (tllib)


def _digits_files(root):
    """A tiny --data digits-files root: MNIST as ImageFolder trees, SVHN as an image list (one 8x8 image a digit)."""
    from PIL import Image

    lines = []
    for digit in range(10):
        for split in ("train", "test"):
            path = root / "MNIST" / split / str(digit) / "0.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), 20 * digit).save(path)
        (root / "svhn_image").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (25 * digit, 0, 0)).save(root / "svhn_image" / f"{digit}.png")
        lines.append(f"svhn_image/{digit}.png {digit}")
    (root / "image_list").mkdir()
    (root / "image_list" / "svhn_balanced.txt").write_text("\n".join(lines) + "\n")


def _files_run(out, **kw):
    options = dict(data="digits-files", root="digits", source="SVHN", target="MNIST", out=str(out), iterations=2,
                   batch_size=4, eval_every=2, bottleneck_dim=8, progress=False, tensorboard=False, device="cpu")
    return PretrainConfig(**{**options, **kw})


@pytest.fixture
def files_teacher(tmp_path, monkeypatch):
    """A `dart pretrain` run on a digits-files root given relative to the working folder, SVHN (an image list) ->
    MNIST: the relative root read the list at digits/digits/image_list/svhn_balanced.txt."""
    _digits_files(tmp_path / "digits")
    monkeypatch.chdir(tmp_path)
    pretrain(_files_run("runs/teacher"))
    return tmp_path / "runs" / "teacher"


def test_rgb_digit_domains_train_as_tllibs_svhn_to_mnist_recipe(tmp_path, monkeypatch):
    """SVHNRGB -> MNISTRGB reads the digits' own files as RGB at 32x32 (tllib's recipe), normalised by 0.5 per
    channel; a task that pairs an RGB domain with a grey one is refused before any work, naming the pair to use."""
    from urda_fast.dart.data import task_data

    _digits_files(tmp_path / "digits")
    monkeypatch.chdir(tmp_path)
    data = task_data(_files_run("x", source="SVHNRGB", target="MNISTRGB"))
    (x, y), (t, _) = data.source_train[3], data.target_test[5]
    assert x.shape == t.shape == (3, 32, 32) and data.mean == data.std == (0.5, 0.5, 0.5)
    torch.testing.assert_close(x[0], torch.full((32, 32), 75 / 255), atol=1 / 255, rtol=0)  # the red channel kept
    assert y == 3 and float(x[1:].abs().max()) < 1 / 255
    assert torch.allclose(t, torch.full_like(t, 100 / 255), atol=1 / 255)  # grey files as three equal channels
    grey = task_data(_files_run("x"))
    assert grey.source_train[3][0].shape == (1, 28, 28) and grey.mean == (0.5,)
    with pytest.raises(ValueError, match=r"-s SVHNRGB is read as RGB at 32x32 but -t MNIST as greyscale at 28x28.*"
                                         r"-s SVHNRGB -t MNISTRGB"):
        pretrain(_files_run("runs/mixed", source="SVHNRGB"))
    with pytest.raises(ValueError, match="Digits has domains MNIST, USPS, SVHN, MNISTRGB, USPSRGB, SVHNRGB, not -t "
                                         "'MNIST-M'"):
        pretrain(_files_run("runs/unknown", target="MNIST-M"))
    assert not os.path.exists("runs")
    pretrain(_files_run("runs/rgb", source="SVHNRGB", target="MNISTRGB", arch="resnet18"))
    model, spec, _ = load_checkpoint_model("runs/rgb")
    assert spec.mean == (0.5, 0.5, 0.5) and model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    # a fresh student on a ResNet without weights: random, unlike the authors' ImageNet start, and said so
    from urda_fast.dart import RobustifyConfig, robustify

    with pytest.warns(UserWarning, match="starts the student from a randomly initialised resnet18 .* give them as "
                                         "--backbone-weights FILE"):
        robustify(RobustifyConfig(teacher="runs/rgb", out="runs/dart", student_init="backbone", iterations=1,
                                  batch_size=4, eval_every=1, attack_steps=1, progress=False, tensorboard=False))


def test_relative_root_trains_and_is_saved_absolute(files_teacher, tmp_path):
    config = torch.load(files_teacher / "best.pt", weights_only=False)["config"]
    assert config["root"] == str(tmp_path / "digits")  # eval and robustify read it from any folder


def test_robustify_defaults_to_the_teachers_data(files_teacher, tmp_path):
    """Without --data, step 2 reads the teacher's data (it trained on the embedded digits whatever the teacher's); an
    explicit other --data is a warning."""
    from urda_fast.dart import RobustifyConfig, robustify

    common = dict(teacher=str(files_teacher), iterations=1, batch_size=4, eval_every=1, attack_steps=1,
                  progress=False, tensorboard=False, device="cpu")
    robustify(RobustifyConfig(out=str(tmp_path / "dart"), **common))
    config = torch.load(tmp_path / "dart" / "best.pt", weights_only=False)["config"]
    assert {k: config[k] for k in ("data", "root", "source", "target")} == \
        {"data": "digits-files", "root": str(tmp_path / "digits"), "source": "SVHN", "target": "MNIST"}
    with pytest.warns(UserWarning, match="teacher .* was trained on --data digits-files -t MNIST, and this run reads "
                                         "--data digits: .*leave out --data"):
        robustify(RobustifyConfig(data="digits", out=str(tmp_path / "other"), **common))


def test_eval_flags_override_the_runs_data(files_teacher, tmp_path, monkeypatch):
    """Each of --data, --root, -s, -t overrides the run's saved value (a moved dataset, another target); eval reads
    the target's test split only, so another --data needs no -s; a saved root that is gone says to give --root."""
    from urda_fast.dart import RunConfig, evaluate_runs

    def data(**flags):
        return evaluate_runs([str(files_teacher)], attacks=("clean",), data_flags=flags, device="cpu",
                             progress=False)["data"]

    assert data() == f"Digits: SVHN -> MNIST from {tmp_path / 'digits'}"
    assert data(target="SVHN") == f"Digits: SVHN -> SVHN from {tmp_path / 'digits'}"
    # the command line passes its flags alike; -t is short for --target
    assert main(["dart", "eval", str(files_teacher), "--attacks", "clean", "-t", "SVHN", "--device", "cpu",
                 "--out", str(tmp_path / "report")]) == 0
    assert json.loads((tmp_path / "report" / "report.json").read_text())["data"].startswith("Digits: SVHN -> SVHN")
    os.rename(tmp_path / "digits", tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="trained on the dataset root .*digits', which is not there now.*"
                                                "give --root"):
        data()
    assert data(root=str(tmp_path / "moved")).endswith(f"from {tmp_path / 'moved'}")
    assert data(root="moved") == "Digits: SVHN -> MNIST from moved"  # relative to the working folder
    # another --data takes none of the run's root and domains, and needs no source
    with pytest.raises(ValueError, match="--data office31 needs --root"):
        data(data="office31", target="A")
    with pytest.raises(ValueError, match="--data office31 needs -t/--target, from A, D, W"):
        data(data="office31", root="moved")
    with pytest.raises(ValueError, match="embedded printed -> handwritten task, which takes no --root"):
        data(data="digits", root="moved")  # an impossible combination
    with pytest.raises(ValueError, match="unknown data setting"):
        data(roots="moved")
    # a RunConfig (the library's way) works alike: its empty fields are the run's
    assert evaluate_runs([str(files_teacher)], attacks=("clean",), data_cfg=RunConfig(data="digits-files",
                         root="moved"), device="cpu", progress=False)["data"].endswith("MNIST from moved")
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        evaluate_runs([str(files_teacher)], device="gpu")


def test_eval_reads_an_older_runs_relative_root(files_teacher, tmp_path, monkeypatch):
    """Runs used to save the root as given: relative to the folder they were started in, which the run's own
    relative --out locates when eval runs from elsewhere."""
    from urda_fast.dart import evaluate_runs

    state = torch.load(files_teacher / "best.pt", weights_only=False)
    state["config"]["root"] = "digits"
    torch.save(state, files_teacher / "best.pt")
    monkeypatch.chdir(tmp_path / "runs")
    report = evaluate_runs([str(files_teacher)], attacks=("clean",), device="cpu", progress=False)
    assert report["data"] == f"Digits: SVHN -> MNIST from {tmp_path / 'digits'}"
    state["config"]["out"] = "elsewhere/teacher"
    torch.save(state, files_teacher / "best.pt")
    with pytest.raises(FileNotFoundError, match="root 'digits', which is not there now .*give --root"):
        evaluate_runs([str(files_teacher)], attacks=("clean",), device="cpu", progress=False)


def test_the_bottleneck_width_defaults_to_tllibs_for_the_method():
    """tllib's ImageClassifier bottleneck: 256 wide, 1024 for MDD (methods.md); a width given is kept."""
    assert PretrainConfig().bottleneck_dim == 256
    assert PretrainConfig(method="mdd").bottleneck_dim == 1024
    assert PretrainConfig(method="mdd", bottleneck_dim=32).bottleneck_dim == 32
    from urda_fast.cli import _load_config, build_parser

    args = build_parser().parse_args(["dart", "pretrain", "--method", "mdd"])
    assert _load_config(args, PretrainConfig).bottleneck_dim == 1024


def test_the_classifier_layout_defaults_to_tllibs_for_the_method(tmp_path):
    """MDD trains tllib's MDD classifier (dropout, a two-layer head), the others the standard one; either can be
    asked for, and checkpoints written before the layout was saved load as the standard one they are."""
    from urda_fast.dart.config import check_pretrain_config
    from urda_fast.models import ModelSpec

    assert (PretrainConfig().classifier, PretrainConfig(method="mdd").classifier) == ("standard", "mdd")
    assert PretrainConfig(method="mdd", classifier="standard").classifier == "standard"
    with pytest.raises(ValueError, match="classifier must be one of 'standard', 'mdd', got 'two-layer'"):
        check_pretrain_config(PretrainConfig(classifier="two-layer"))
    pretrain(_cfg(tmp_path / "teacher", method="dann", classifier="mdd"))
    model, spec, _ = load_checkpoint_model(str(tmp_path / "teacher"))
    assert spec.layout == "mdd" and isinstance(model.head, torch.nn.Sequential)
    # DART step 2 from it: the attack folds the bottleneck's BatchNorm (dropout follows it); a fresh student keeps
    # the layout
    from urda_fast.dart import RobustifyConfig, robustify

    for init in ("teacher", "backbone"):
        out = tmp_path / f"student-from-{init}"
        robustify(RobustifyConfig(teacher=str(tmp_path / "teacher"), out=str(out), iterations=2, batch_size=16,
                                  attack_steps=2, attack_eps=0.1, attack_alpha=0.05, fold_batchnorm="on",
                                  student_init=init, progress=False))
        student, student_spec, _ = load_checkpoint_model(str(out))
        assert student_spec.layout == "mdd" and [type(m) for m in student.bottleneck][-1] is torch.nn.Dropout
    old = {k: v for k, v in ModelSpec(bottleneck_dim=32).to_dict().items() if k != "layout"}
    assert ModelSpec.from_dict(old).build().layout == "standard"


def test_run_lengths_default_to_the_references():
    """Step 1: tllib's 20 epochs x 1000 iterations; step 2: the authors' 10,000 (methods.md)."""
    from urda_fast.dart import RobustifyConfig

    assert (PretrainConfig().iterations, RobustifyConfig().iterations) == (20000, 10000)
