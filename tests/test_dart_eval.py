"""`dart eval` at scale: each run reads the target test split once for every attack and budget, only the batches it
is asked for, and gives the figures that evaluating each budget on its own gives."""

import dataclasses
import os
from collections import Counter

import pytest
from conftest import digits_uda_checkpoint
from torch.utils.data import Dataset

import urda_fast.dart.report as report_module
from urda_fast.dart import RunConfig, evaluate_runs
from urda_fast.data import subset
from urda_fast.evaluate import robust_accuracy


class CountingDataset(Dataset):
    """The target test split, counting which images were read (a stand-in for decoding image files)."""

    def __init__(self, dataset):
        self.dataset, self.reads = dataset, Counter()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.reads[index] += 1
        return self.dataset[index]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return digits_uda_checkpoint(tmp_path_factory.mktemp("run"), bottleneck_dim=16, steps=30)


@pytest.fixture
def counted(monkeypatch):
    """Makes evaluate_runs read its target test split through a CountingDataset; yields the dataset."""
    real_task_data, holder = report_module.task_data, {}

    def task_data(cfg, splits):
        data = real_task_data(cfg, splits)
        holder["dataset"] = CountingDataset(data.target_test)
        return dataclasses.replace(data, target_test=holder["dataset"])

    monkeypatch.setattr(report_module, "task_data", task_data)
    return holder


def test_each_run_reads_only_the_batches_asked_for_once(checkpoint, counted):
    path, _ = checkpoint
    evaluate_runs([path, path], attacks=("clean", "fgsm", "pgd3"), eps=(0.1, 0.2), device="cpu", progress=False,
                  batch_size=16, max_batches=2, num_workers=0)
    reads = counted["dataset"].reads
    # Two runs, each reading the same 32 images once for clean and both budgets of both attacks (before: every budget
    # read the whole split of 540 images, whatever max_batches said): a fixed random sample, not the first 32 (tllib's
    # class-sorted lists would be scored on their first classes alone).
    sample = subset(counted["dataset"], 32).indices
    assert reads == Counter({index: 2 for index in sample}) and max(sample) > 100


def test_figures_equal_one_budget_at_a_time(checkpoint):
    path, model = checkpoint
    budgets = (0.1, 0.25)
    report = evaluate_runs([path], attacks=("clean", "fgsm", "pgd3"), eps=budgets, device="cpu", progress=False,
                           batch_size=64, max_batches=3)
    from urda_fast.dart.data import task_data

    dataset = task_data(RunConfig(data="digits"), splits=("target_test",)).target_test
    sample = subset(dataset, 192)
    batches = [sample[i:i + 64] for i in range(0, 192, 64)]
    row = report["rows"][0]
    for budget in budgets:
        table = robust_accuracy(model, batches, report_module.make_attacks(model, ("clean", "fgsm", "pgd3"), budget),
                                progress=False)
        for name in ("fgsm", "pgd3"):
            assert row[report_module.budget_key(name, budget)] == round(table[name].accuracy, 2)
        assert row["clean"] == round(table["clean"].accuracy, 2)
    assert row["fgsm"] == row[report_module.budget_key("fgsm", 0.1)]
    assert row["pgd"] == row[report_module.budget_key("pgd3", 0.1)]
    assert row[report_module.budget_key("pgd3", 0.25)] < row["clean"]  # the attacks did something


def test_normalised_attack_spaces_evaluate_the_training_threat_models(checkpoint):
    """--attack-space normalized at eps 2e on the digits (mean 0.5, std 0.5: [0, 1] maps onto [-1, 1]) is the pixel
    attack at e; "code" clips normalised values to [0, 1], which moves every dark pixel far beyond eps."""
    path, _ = checkpoint
    common = dict(attacks=("clean", "fgsm", "pgd3"), device="cpu", progress=False, batch_size=64, max_batches=3)
    pixel = evaluate_runs([path], eps=(0.1,), **common)
    normalized = evaluate_runs([path], eps=(0.2,), attack_space="normalized", **common)
    code = evaluate_runs([path], eps=(0.2,), attack_space="code", **common)
    for name in ("clean", "fgsm", "pgd"):
        assert abs(normalized["rows"][0][name] - pixel["rows"][0][name]) <= 100 / 192 + 1e-9, name  # one image
    assert code["rows"][0]["clean"] == pixel["rows"][0]["clean"] and code["rows"][0]["pgd"] < code["rows"][0]["clean"]
    assert code["attack_space"] == "code" and "budgets in normalised units (--attack-space code)" in \
        report_module.to_markdown(code)


@pytest.mark.parametrize("settings, message", [
    (dict(eps=()), "at least one"), (dict(eps=(-0.1,)), "positive"), (dict(eps=(float("nan"),)), "positive"),
    (dict(batch_size=0), "batch_size"), (dict(num_workers=-1), "num_workers"), (dict(max_batches=-2), "max_batches"),
    (dict(attacks=("clean", "pgd")), "unknown attack"),
    (dict(attack_space="normalised"), "attack_space must be one of 'pixel', 'normalized', 'code'"),
    (dict(attacks=("clean", "autoattack"), attack_space="code"), "autoattack runs in pixel space only"),
])
def test_bad_settings_fail_before_any_work(checkpoint, counted, settings, message):
    path, _ = checkpoint
    with pytest.raises(ValueError, match=message):
        evaluate_runs([path], **{"device": "cpu", "progress": False, **settings})
    assert "dataset" not in counted  # no data was read


def test_autoattack_is_one_of_the_attacks(checkpoint, monkeypatch):
    """methods.md's optional AutoAttack, through the adapter (torchattacks' port here); without a package, a clear
    error before any work."""
    from urda_fast.attacks import autoattack

    path, _ = checkpoint
    if autoattack.autoattack_backend() is not None:
        report = evaluate_runs([path], attacks=("clean", "pgd5", "autoattack"), eps=(0.1,), device="cpu",
                               progress=False, batch_size=32, max_batches=1)
        row = report["rows"][0]
        assert row["autoattack"] <= row["pgd5"] + 1e-9 and row["autoattack"] < row["clean"]
    monkeypatch.setattr(report_module, "autoattack_backend", lambda: None)
    with pytest.raises(ImportError, match="pip install"):
        evaluate_runs([path], attacks=("clean", "autoattack"), device="cpu", progress=False)


# ------------------------------------------------------------------------------------------------ dart summary
def _report(folder, task, rows, **fields):
    import json

    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"data": task, "eps": [8 / 255], "rows": rows, **fields}))
    return str(folder)


def test_summary_refuses_mixed_units_and_flags_partial_evaluations(tmp_path):
    from urda_fast.dart.summary import summarize, to_markdown

    row = {"method": "dart", "run": "y", "clean": 80.0, "fgsm@0.1": 30.0, "count": 64}
    pixel = _report(tmp_path / "pixel", "A->W", [row], attack_space="pixel", test_images=795)
    normalized = _report(tmp_path / "normalized", "D->W", [{**row, "count": 795}], attack_space="normalized",
                         test_images=795)
    with pytest.raises(ValueError, match="budgets are in different units .*'A->W': 'pixel', 'D->W': 'normalized'"):
        summarize([pixel, normalized])
    full = _report(tmp_path / "full", "D->W", [{**row, "count": 795}], attack_space="pixel", test_images=795)
    summary = summarize([pixel, full])
    assert summary["partial"] == ["A->W"] and summary["attack_space"] == "pixel"
    assert "Scored on part of the test split (dart eval --max-batches): A->W" in to_markdown(summary)
    assert summarize([full])["partial"] == []


def test_eval_records_what_it_scored_and_refuses_repeats(checkpoint, tmp_path):
    path, _ = checkpoint
    options = dict(device="cpu", progress=False, batch_size=32, num_workers=0)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.png").write_bytes(b"an older evaluation's plot")
    report = evaluate_runs([path], attacks=("clean",), max_batches=1, out=str(tmp_path / "r"), **options)
    assert report["rows"][0]["count"] == 32 and report["test_images"] > 32
    assert (tmp_path / "r" / "report.png").read_bytes().startswith(b"\x89PNG")  # this report's own plot
    for attacks, eps, match in ((("clean", "fgsm", "fgsm"), (0.1,), "attacks given more than once: fgsm"),
                                (("fgsm",), (0.1, 0.1), r"budgets \(as the report keys them\) given more than once"),
                                (("fgsm",), (0.031372, 0.0313725), "given more than once: pgd@0.03137")):
        with pytest.raises(ValueError, match=match):
            evaluate_runs([path], attacks=attacks, eps=eps, **options)


def test_summary_averages_each_method_over_the_tasks(tmp_path):
    from urda_fast.dart.summary import summarize, to_markdown

    a2w = _report(tmp_path / "a2w", "Office31 A->W", [
        {"method": "dann", "run": "x", "clean": 80.0, "pgd20@0.03137": 10.0, "fgsm@0.03137": 30.0},
        {"method": "dart", "run": "y", "clean": 78.0, "pgd20@0.03137": 40.0, "fgsm@0.03137": 50.0}])
    d2w = _report(tmp_path / "d2w", "Office31 D->W", [
        {"method": "dann", "run": "x", "clean": 96.0, "pgd20@0.03137": 20.0},
        {"method": "dart", "run": "y", "clean": 95.0, "pgd20@0.03137": 61.0},
        {"method": "cdan", "run": "z", "clean": 97.0, "pgd20@0.03137": 5.0}])
    summary = summarize([a2w, d2w + "/report.json"], out=str(tmp_path / "out"))
    assert summary["tasks"] == ["Office31 A->W", "Office31 D->W"] and summary["keys"] == ["clean", "pgd20@0.03137"]
    assert summary["dropped"] == ["fgsm@0.03137"]
    means = {row["method"]: row["mean"] for row in summary["rows"]}
    assert means == {"dann": {"clean": 88.0, "pgd20@0.03137": 15.0}, "dart": {"clean": 86.5, "pgd20@0.03137": 50.5},
                     "cdan": None}  # cdan ran on one task only: no mean over two
    text = to_markdown(summary)
    assert "| dart | 86.50 | 50.50 |" in text and "| cdan | - | - |" in text and "| 97.00 / 5.00 |" in text
    assert (tmp_path / "out" / "summary.md").read_text() == text


def test_summary_refuses_what_would_not_pair_up(tmp_path):
    from urda_fast.dart.summary import summarize

    row = {"method": "uda", "run": "x", "clean": 80.0}
    twice = _report(tmp_path / "twice", "A->W", [row, {**row, "run": "z"}])
    with pytest.raises(ValueError, match=r"several rows labelled \['uda'\].*--label RUN=NAME"):
        summarize([twice])
    one = _report(tmp_path / "one", "A->W", [row])
    with pytest.raises(ValueError, match=r"a task is given twice \(\['A->W'\]\)"):
        summarize([one, one])
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a `dart eval` report"):
        summarize([str(tmp_path / "junk.json")])
    with pytest.raises(FileNotFoundError, match="nowhere' not found; give `dart eval --out` folders"):
        summarize([str(tmp_path / "nowhere")])


def test_eval_labels_its_rows_and_the_summary_reads_the_cli_report(checkpoint, tmp_path, capsys):
    from urda_fast.cli import main

    path, _ = checkpoint
    common = ["--attacks", "clean,pgd2", "--device", "cpu", "--batch-size", "32", "--max-batches", "1",
              "--num-workers", "0"]
    folder = os.path.dirname(path)
    assert main(["dart", "eval", path, folder, "--label", f"{path}=dann", "--label", f"{folder}=again",
                 "--out", str(tmp_path / "r")] + common) == 0
    assert main(["dart", "summary", str(tmp_path / "r"), "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "mean over 1 task" in out and "| dann |" in out and "| again |" in out
    with pytest.raises(SystemExit, match="--label 'elsewhere=x' names 'elsewhere', which is not one of the runs"):
        main(["dart", "eval", path, "--label", "elsewhere=x"] + common)
    with pytest.raises(SystemExit, match=f"--label names '{path}' twice \\('a', 'b'\\); give one"):
        main(["dart", "eval", path, "--label", f"{path}=a", "--label", f"{path}=b"] + common)
    with pytest.raises(SystemExit, match=r"the labels given name two runs alike \(\['x'\]\)"):
        main(["dart", "eval", path, folder, "--label", f"{path}=x", "--label", f"{folder}=x"] + common)
    with pytest.warns(UserWarning, match=r"several rows are named \['uda'\].*--label RUN=NAME"):
        main(["dart", "eval", path, folder] + common)


def _retagged(path, folder, **config):
    """A copy of the checkpoint at ``path`` whose saved config says it was trained with ``config``'s data fields."""
    import torch

    state = torch.load(path, weights_only=False)
    state["config"] = {**state["config"], **config}
    folder.mkdir()
    torch.save(state, folder / "best.pt")
    return str(folder)


def test_runs_of_another_task_do_not_share_a_report(checkpoint, tmp_path):
    """A run trained for another target would be listed under the first run's task, its figures those of a model
    scored on a domain it never saw: refused, or a warning when --data / -t ask for that target."""
    path, _ = checkpoint
    other = _retagged(path, tmp_path / "other", data="digits-files", root=str(tmp_path), source="MNIST",
                      target="USPS")
    options = dict(attacks=("clean",), device="cpu", progress=False, batch_size=32, max_batches=1, num_workers=0)
    for runs in ([path, other], [other, path]):
        with pytest.raises(ValueError, match=r"was trained for --data \w+( -t USPS)?, and the report evaluates "
                                             r"--data \w+( -t USPS)? \(the first run's\): runs of different tasks"):
            evaluate_runs(runs, **options)
    with pytest.warns(UserWarning, match=r"other/best.pt' was trained for --data Digits -t USPS.*as --data"):
        report = evaluate_runs([path, other], data_flags={"data": "digits"}, **options)
    assert len(report["rows"]) == 2
    # -s is unused by eval: it does not rename the task in the report
    plain = evaluate_runs([path], **options)["data"]
    assert evaluate_runs([path], data_flags={"source": "SVHN"}, **options)["data"] == plain
