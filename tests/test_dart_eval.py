"""`dart eval` at scale: each run reads the target test split once for every attack and budget, only the batches it
is asked for, and gives the figures that evaluating each budget on its own gives."""

import dataclasses
from collections import Counter

import pytest
from conftest import digits_uda_checkpoint
from torch.utils.data import Dataset

import urda_fast.dart.report as report_module
from urda_fast.dart import RunConfig, evaluate_runs
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
    # Two runs, each reading images 0..31 once for clean and both budgets of both attacks (before: every budget
    # read the whole split of 540 images, whatever max_batches said).
    assert reads == Counter({index: 2 for index in range(32)})


def test_figures_equal_one_budget_at_a_time(checkpoint):
    path, model = checkpoint
    budgets = (0.1, 0.25)
    report = evaluate_runs([path], attacks=("clean", "fgsm", "pgd3"), eps=budgets, device="cpu", progress=False,
                           batch_size=64, max_batches=3)
    from urda_fast.dart.data import task_data

    dataset = task_data(RunConfig(data="digits"), splits=("target_test",)).target_test
    batches = [dataset[i:i + 64] for i in range(0, 192, 64)]
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


@pytest.mark.parametrize("settings, message", [
    (dict(eps=()), "at least one"), (dict(eps=(-0.1,)), "positive"), (dict(eps=(float("nan"),)), "positive"),
    (dict(batch_size=0), "batch_size"), (dict(num_workers=-1), "num_workers"), (dict(max_batches=-2), "max_batches"),
    (dict(attacks=("clean", "pgd")), "unknown attack"),
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
