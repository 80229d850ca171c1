"""The shared loop's TensorBoard log: scalars of every CSV column, and no step twice after a kill and a resume; a
SIGTERM or Ctrl-C saves the step it lands in."""

import csv
import glob
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from urda_fast.data import ForeverDataIterator, make_loader
from urda_fast.train import LoopSettings, fit

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402


class LinearTask:
    """Least squares on 64 fixed points: a task that trains in milliseconds. ``fail_at`` raises in that step (a
    kill that lands after the logs of the steps before it, but after the last checkpoint)."""

    name = "linear"

    def __init__(self, batch_size=8, fail_at=None, rank=0, world_size=1, signal_at=None, nan_at=None):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(64, generator=g)
        self.x, self.y, self.fail_at, self.steps = x, y, fail_at, 0
        self.signal_at = signal_at  # (step, signal): this process receives the signal in the middle of that step
        self.nan_at = nan_at  # from this step on, one input is NaN (bad data): the loss and the weights turn NaN
        self.model = torch.nn.Linear(4, 1)
        self.stream = ForeverDataIterator(make_loader(TensorDataset(x, y), batch_size, train=True, seed=3, rank=rank,
                                                      world_size=world_size))

    def modules(self):
        return {"model": self.model}

    def streams(self):
        return {"data": self.stream}

    def training_step(self):
        self.steps += 1
        if self.steps == self.fail_at:
            raise KeyboardInterrupt("killed")
        x, y = next(self.stream)
        if self.signal_at is not None and self.steps == self.signal_at[0]:
            os.kill(os.getpid(), self.signal_at[1])
        if self.nan_at is not None and self.steps >= self.nan_at:
            x = x.clone()
            x[0, 0] = float("nan")
        loss = F.mse_loss(self.model(x).squeeze(1), y)
        return {"loss": loss, "abs_err": (self.model(x).squeeze(1) - y).abs().mean().detach()}

    @torch.no_grad()
    def evaluate(self):
        return {"neg_mse": -float(F.mse_loss(self.model(self.x).squeeze(1), self.y))}


def fit_task(task, out, extra=None, **settings):
    """``fit`` of ``task`` into ``out``: SGD (lr 0.05 / (1 + it), momentum 0.9), 6 iterations evaluated every 3 and
    logged every step, no TensorBoard; ``settings`` override those LoopSettings."""
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1 / (1 + it))
    options = dict(iterations=6, out_dir=str(out), eval_every=3, log_every=1, progress=False, tensorboard=False,
                   select_metric="neg_mse")
    return fit(task, optimizer, scheduler, LoopSettings(**{**options, **settings}), device=torch.device("cpu"),
               extra=extra)


def run(out, iterations=6, resume=False, overwrite=False, **task_options):
    torch.manual_seed(0)
    return fit_task(LinearTask(**task_options), out, iterations=iterations, resume=resume, overwrite=overwrite,
                    tensorboard=True)


@pytest.fixture(autouse=True)
def _writer_count_from_zero(monkeypatch):
    """Event files are named events.out.tfevents.<seconds>.<host>.<pid>.<n>, n counting the SummaryWriters of the
    process, and TensorBoard reads a folder's files in name order: a run killed and resumed in one second, in a
    process that had made 9 writers before (earlier tests), would have its files read as "...10" before "...9". A
    real resume is a new process; here each test counts from 0."""
    from tensorboard.summary.writer import event_file_writer

    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(0))


def scalars(out) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: {tag: [(step, value), ...]} after its purge of orphaned events."""
    acc = EventAccumulator(os.path.join(out, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def raw_steps(out, tag) -> list[int]:
    """Every step written under ``tag``, over all event files, purged or not."""
    steps = []
    for path in sorted(glob.glob(os.path.join(out, "tb", "events.out.tfevents.*"))):
        for event in EventFileLoader(path).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def test_tensorboard_holds_every_logged_metric(tmp_path):
    run(tmp_path)
    tb = scalars(tmp_path)
    assert set(tb) == {"train/loss", "train/abs_err", "train/lr", "eval/neg_mse"}
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in tb["eval/neg_mse"]] == [3, 6]
    # the same numbers as log.csv
    rows = (tmp_path / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    last_train = dict(zip(header, rows[-2].split(",")))
    assert float(last_train["loss"]) == pytest.approx(tb["train/loss"][-1][1], rel=1e-5)


def test_resume_after_kill_does_not_repeat_steps(tmp_path):
    full = tmp_path / "full"
    run(full)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run(killed, fail_at=5)  # checkpoint at 3; steps 1-4 logged
    assert raw_steps(killed, "train/loss") == [1, 2, 3, 4]
    run(killed, resume=True)
    assert raw_steps(killed, "train/loss") == [1, 2, 3, 4, 4, 5, 6]  # step 4 written twice on disk ...
    resumed, reference = scalars(killed), scalars(full)
    assert resumed.keys() == reference.keys()
    for tag in reference:  # ... and shown once, with the uninterrupted run's values (bit-for-bit resume)
        assert resumed[tag] == reference[tag], tag


@pytest.mark.parametrize("signum, stops_with", [(signal.SIGTERM, SystemExit), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_saves_the_step_it_lands_in(tmp_path, signum, stops_with, capsys):
    """A preemption's SIGTERM or a Ctrl-C in step 4 (checkpoints every 3 steps): step 4 ends, last.pt holds it, and a
    resume continues from 5 -- nothing lost, nothing repeated, the uninterrupted run's values bit for bit."""
    before = signal.getsignal(signum)
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run(full)
    with pytest.raises(stops_with) as stop:
        run(stopped, signal_at=(4, signum))
    if stops_with is SystemExit:
        assert stop.value.code == 128 + signal.SIGTERM  # the status a process killed by SIGTERM reports
    assert signal.getsignal(signum) is before  # the loop's handler is gone with the loop
    assert torch.load(stopped / "last.pt", weights_only=False)["iteration"] == 4
    assert "after iteration 4" in capsys.readouterr().err
    run(stopped, resume=True)
    assert raw_steps(stopped, "train/loss") == [1, 2, 3, 4, 5, 6]  # step 4 was saved: not run twice
    resumed, reference = scalars(stopped), scalars(full)
    assert resumed.keys() == reference.keys()
    for tag in reference:
        assert resumed[tag] == reference[tag], tag


def test_a_nan_loss_stops_the_run_at_its_logging_step(tmp_path):
    with pytest.raises(FloatingPointError, match=r"loss is nan at iteration 5 \(.*last.pt holds iteration 3\); "
                                                 "check the data"):
        run(tmp_path, nan_at=5)  # logs every step, checkpoints every 3
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["iteration"] == 3 and all(torch.isfinite(v).all() for v in state["modules"]["model"].values())


def test_fresh_run_hides_an_earlier_run_in_the_folder(tmp_path):
    run(tmp_path, iterations=6)
    # without --resume or --overwrite, a relaunch must not replace the earlier run's checkpoints
    earlier = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(ValueError, match="holds an earlier run's last.pt and best.pt; pass --resume .* --overwrite"):
        run(tmp_path, iterations=3)
    assert (tmp_path / "last.pt").read_bytes() == earlier
    (tmp_path / "last.pt").rename(tmp_path / "moved.pt")
    with pytest.raises(ValueError, match="holds an earlier run's best.pt but no last.pt to resume from"):
        run(tmp_path, iterations=3, resume=True)
    run(tmp_path, iterations=3, overwrite=True)
    assert [s for s, _ in scalars(tmp_path)["train/loss"]] == [1, 2, 3]


def test_a_fresh_run_clears_the_logs_of_one_killed_before_its_first_checkpoint(tmp_path):
    """No checkpoint: nothing to refuse or resume, but its events would sit beside this run's in tb/."""
    (tmp_path / "tb").mkdir(parents=True)
    (tmp_path / "tb" / "events.out.tfevents.1.host.1.0").write_bytes(b"killed run")
    (tmp_path / "log.csv").write_text("iteration,train/loss\n1,9.0\n")
    run(tmp_path, iterations=3)
    assert "events.out.tfevents.1.host.1.0" not in os.listdir(tmp_path / "tb")
    assert [s for s, _ in scalars(tmp_path)["train/loss"]] == [1, 2, 3]
    assert "9.0" not in (tmp_path / "log.csv").read_text()


def test_a_run_folder_that_is_a_file_is_named(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(FileExistsError, match="the run folder .*out is a file; give another --out"):
        run(tmp_path / "out", iterations=2)


def test_tensorboard_can_be_turned_off(tmp_path):
    fit_task(LinearTask(), tmp_path, iterations=2, tensorboard=False)
    assert (tmp_path / "log.csv").exists() and not (tmp_path / "tb").exists()


def test_overwrite_removes_the_earlier_runs_files_before_it_writes_any(tmp_path):
    run(tmp_path, iterations=6)
    assert {"best.pt", "last.pt", "log.csv"} <= set(os.listdir(tmp_path)) and os.listdir(tmp_path / "tb")
    # killed in its first step, before any checkpoint, evaluation or log flush of its own
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, iterations=6, overwrite=True, fail_at=1)
    assert not {"best.pt", "last.pt", "log.csv"} & set(os.listdir(tmp_path))
    assert not raw_steps(tmp_path, "train/loss")  # nor the earlier run's TensorBoard events


class NamedMetricsTask(LinearTask):
    def metric_names(self):
        return ["neg_mse"]


def test_an_unknown_select_metric_is_refused(tmp_path):
    def fit_with(task, metric):
        return fit_task(task, tmp_path / "run", iterations=4, eval_every=2, log_every=10, select_metric=metric)

    # a task that names its metrics: before any work or file
    with pytest.raises(ValueError, match=r"select_metric 'clean_acc' is not one of this run's evaluation metrics "
                                         r"\(neg_mse\)"):
        fit_with(NamedMetricsTask(), "clean_acc")
    assert not (tmp_path / "run").exists()
    # one that does not: at its first evaluation, never a run without best.pt
    with pytest.raises(ValueError, match=r"select_metric 'clean_acc' is not one of .* \(neg_mse\)"):
        fit_with(LinearTask(), "clean_acc")
    assert not (tmp_path / "run" / "best.pt").exists()
    assert fit_with(NamedMetricsTask(), "neg_mse")["best"]["iteration"] in (2, 4)


def test_the_logged_lr_is_the_one_each_step_used(tmp_path):
    run(tmp_path, iterations=6)  # lr 0.05 / (1 + it) at step it = 0, 1, ... (iteration it + 1)
    with open(tmp_path / "log.csv") as f:
        lrs = {int(r["iteration"]): float(r["lr"]) for r in csv.DictReader(f) if r["lr"]}
    assert lrs == pytest.approx({it: 0.05 / it for it in range(1, 7)}, rel=1e-5)


def test_resume_refuses_a_changed_input_file(tmp_path):
    from urda_fast.run_files import input_fingerprints

    teacher = tmp_path / "teacher.pt"
    torch.save({"w": torch.zeros(3)}, teacher)

    def fit_inputs(resume, stop_after):
        torch.manual_seed(0)
        return fit_task(LinearTask(), tmp_path / "run", iterations=4, eval_every=2, log_every=10, resume=resume,
                        stop_after=stop_after,
                        extra={"inputs": input_fingerprints({"--teacher": str(teacher), "--other": ""})})

    fit_inputs(False, 2)
    assert set(torch.load(tmp_path / "run" / "last.pt", weights_only=False)["inputs"]) == {"--teacher"}
    os.utime(teacher, (0, 0))  # touched, same bytes: still the run's own file
    fit_inputs(True, 3)
    torch.save({"w": torch.ones(3)}, teacher)
    with pytest.raises(ValueError, match="--teacher '.*teacher.pt' has changed since the run began \\(same size, "
                                         "other content\\)"):
        fit_inputs(True, None)


class CudnnFlagTask(LinearTask):
    def training_step(self):
        self.flags = getattr(self, "flags", []) + [torch.backends.cudnn.benchmark]
        return super().training_step()


@pytest.mark.parametrize("on", [True, False])
def test_cudnn_benchmark_is_set_for_the_loop_only(tmp_path, on, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not on)
    task = CudnnFlagTask(fail_at=4)
    with pytest.raises(KeyboardInterrupt):  # restored also when a step fails
        fit_task(task, tmp_path, cudnn_benchmark=on)
    assert task.flags == [on] * 4
    assert torch.backends.cudnn.benchmark is (not on)


def test_logged_metrics_are_read_in_one_transfer(tmp_path):
    """Each tensor metric read apart was a host sync per metric at every logging step on a GPU."""
    from conftest import ScalarReads

    from urda_fast.train import _metric_values

    metrics = {"loss": torch.tensor(1.5), "acc": torch.tensor([0.25]), "lr": 0.1, "kept": torch.tensor(3)}
    with ScalarReads() as reads:
        values = _metric_values(metrics)
    assert values == {"loss": 1.5, "acc": 0.25, "lr": 0.1, "kept": 3.0} and reads.count <= 1
    assert all(type(v) is float for v in values.values())


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """The loss turns NaN at step 5, between logging steps (every 10); the checkpoint due at 6 must not replace the
    good one of step 3 with NaN weights."""
    with pytest.raises(FloatingPointError, match="weights are not finite at iteration 6.*holds iteration 3"):
        fit_task(LinearTask(nan_at=5), tmp_path, iterations=12, log_every=10)
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in state["modules"]["model"].values())


def test_the_logs_are_written_before_last_pt(tmp_path, monkeypatch):
    """A kill between the two would otherwise lose the rows since the last checkpoint for good (a resume keeps the
    log up to its checkpoint and does not redo those steps)."""
    import urda_fast.train as train_module

    real_save = train_module.atomic_save

    def save(obj, path):
        if path.endswith("last.pt") and obj["iteration"] == 6:
            raise KeyboardInterrupt("killed while saving")
        real_save(obj, path)

    monkeypatch.setattr(train_module, "atomic_save", save)
    with pytest.raises(KeyboardInterrupt):
        fit_task(LinearTask(), tmp_path)
    with open(tmp_path / "log.csv") as f:
        steps = [int(row["iteration"]) for row in csv.DictReader(f) if row.get("loss")]
    assert steps == list(range(1, 7))


def test_a_second_sigterm_is_ignored_and_a_second_ctrl_c_stops():
    """Under torchrun a scheduler's SIGTERM reaches each worker twice (directly and forwarded by the agent): the
    second must not kill the step that is finishing to save last.pt."""
    from urda_fast.train import _StopOnSignal

    stop = _StopOnSignal()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # after a SIGTERM, Ctrl-C still stops at once
    finally:
        stop.restore()


def test_a_folder_in_use_by_another_run_is_refused(tmp_path):
    from urda_fast.run_files import RunLock

    holder = RunLock(str(tmp_path))
    assert holder.acquire() is None
    try:
        with pytest.raises(ValueError, match=f"in use by another run \\(process {os.getpid()}"):
            fit_task(LinearTask(), tmp_path)
        assert not (tmp_path / "last.pt").exists()
    finally:
        holder.release()
    fit_task(LinearTask(), tmp_path, iterations=3)  # free again


def test_a_failed_save_names_the_file_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import urda_fast.train as train_module
    from urda_fast.run_files import CheckpointWriteError

    (tmp_path / "best.pt.tmp999").write_bytes(b"a killed save")  # removed by the next run, under the lock
    fit_task(LinearTask(), tmp_path, iterations=3, overwrite=True)
    assert not (tmp_path / "best.pt.tmp999").exists()
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)  # a partial file, as a full disk leaves
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(train_module.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"could not write .*best.pt.*previous checkpoint there"):
        fit_task(LinearTask(), tmp_path, iterations=6, resume=True)
    monkeypatch.undo()
    assert torch.load(tmp_path / "best.pt", weights_only=False)["iteration"] == 3
    assert not list(tmp_path.glob("*.tmp*"))


CONFIG = {"config": {"batch": 8}}


def seeded_task(**options):
    torch.manual_seed(0)  # the model's initial weights
    return LinearTask(**options)


def test_a_run_killed_inside_its_first_checkpoint_resumes_from_the_beginning(tmp_path, monkeypatch):
    """best.pt written, then the kill before the first last.pt: --resume starts over (a relaunch script that always
    passes --resume used to fail for good), and ends with the uninterrupted run's weights."""
    import urda_fast.train as train_module

    fit_task(seeded_task(), tmp_path / "full", iterations=6, extra=CONFIG)
    real_save = train_module.atomic_save

    def killed(obj, path):
        if path.endswith("last.pt"):
            raise KeyboardInterrupt("killed")
        real_save(obj, path)

    monkeypatch.setattr(train_module, "atomic_save", killed)
    with pytest.raises(KeyboardInterrupt):
        fit_task(seeded_task(), tmp_path / "run", iterations=6, extra=CONFIG)
    monkeypatch.undo()
    assert (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "run" / "last.pt").exists()
    with pytest.warns(UserWarning, match="starting from the beginning"):
        fit_task(seeded_task(), tmp_path / "run", iterations=6, resume=True, extra=CONFIG)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["modules"]["model"]
    b = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["modules"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="best.pt but no last.pt"):  # another run's best.pt is not replaced
        (tmp_path / "run" / "last.pt").unlink()
        fit_task(LinearTask(batch_size=4), tmp_path / "run", iterations=6, resume=True, extra={"config": {"batch": 4}})
    # this run's best.pt from after its first last.pt: that last.pt was lost, not never written; no silent restart
    best = torch.load(tmp_path / "full" / "best.pt", weights_only=False)
    torch.save({**best, "iteration": 6}, tmp_path / "full" / "best.pt")
    (tmp_path / "full" / "last.pt").unlink()
    with pytest.raises(ValueError, match="best.pt but no last.pt to resume from"):
        fit_task(seeded_task(), tmp_path / "full", iterations=6, resume=True, extra=CONFIG)


def test_a_best_pt_newer_than_the_checkpoint_is_the_runs_best_at_a_resume(tmp_path):
    from urda_fast import distributed
    from urda_fast.train import _newer_best

    path = tmp_path / "best.pt"
    torch.save({"iteration": 10, "metrics": {"neg_mse": -0.3}}, path)
    ctx = distributed.context()
    older = {"neg_mse": -4.45, "iteration": 5}
    assert _newer_best(str(path), older, 5, ctx) == {"neg_mse": -0.3, "iteration": 10}
    assert _newer_best(str(path), older, 10, ctx) is older  # not newer than the checkpoint: its own record
    assert _newer_best(str(tmp_path / "none.pt"), older, 5, ctx) is older


def test_a_resume_under_another_precision_is_refused(tmp_path):
    fit_task(LinearTask(), tmp_path, iterations=3)
    with pytest.raises(ValueError, match="trained with amp 'none', now 'bf16'"):
        fit_task(LinearTask(), tmp_path, iterations=6, resume=True, amp="bf16")


def test_a_resume_whose_model_has_another_shape_names_the_module_and_keys(tmp_path):
    """A setting the run's saved config predates (MDD's classifier layout, say) rebuilds another model: the resume
    says which weights do not fit, instead of load_state_dict's raw error."""
    fit_task(LinearTask(), tmp_path, iterations=3)
    task = LinearTask()
    task.model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Linear(2, 1))
    with pytest.raises(ValueError, match=r"'model' weights are another model's than this run builds \(4 missing "
                                         r"key\(s\): 0.weight, 0.bias, 1.weight, \.\.\.; 2 unexpected key\(s\): "
                                         r"weight, bias\); resume with the settings the run was started with"):
        fit_task(task, tmp_path, iterations=6, resume=True)


def test_a_signal_in_the_last_step_ends_the_run_as_usual(tmp_path):
    result = fit_task(LinearTask(signal_at=(6, signal.SIGTERM)), tmp_path, iterations=6)
    assert result["best"] is not None
    assert torch.load(tmp_path / "last.pt", weights_only=False)["iteration"] == 6


def test_an_unwritable_run_folder_is_said_before_any_step(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    task = LinearTask()
    with pytest.raises(PermissionError, match="cannot write the run folder"):
        fit_task(task, tmp_path / "file" / "run")
    assert task.steps == 0


def test_an_input_checkpoint_written_another_way_is_the_same_setting(tmp_path):
    from urda_fast.train import _same_setting

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"")
    (tmp_path / "other.pt").write_bytes(b"")
    run, best = str(tmp_path / "run"), str(tmp_path / "run" / "best.pt")
    assert _same_setting("teacher", run, best) and _same_setting("teacher", run, os.path.join(run, ".", ""))
    assert not _same_setting("teacher", run, str(tmp_path / "other.pt"))
    assert _same_setting("target", f"ViT-B-32:{run}", f"ViT-B-32:{best}")
    assert not _same_setting("target", f"ViT-B-32:{run}", f"ViT-B-16:{best}")  # another architecture
    assert not _same_setting("lr", 0.1, 0.2) and not _same_setting("root", run, best)  # paths of other kinds


def test_resume_by_another_number_of_processes_says_why_an_epoch_run_changed_length():
    """A run given in epochs has as many steps as the global batch takes to cover them: resumed by another number of
    processes its total_steps changes, which the refusal names as the cause."""
    from urda_fast.train import _check_same_run

    with pytest.raises(ValueError, match=r"total_steps 6 -> 3\) \(written by 1 process, resumed by 2: an epoch is "):
        _check_same_run({"total_steps": 6}, {"total_steps": 3}, "last.pt", (1, 2))
    with pytest.raises(ValueError, match=r"total_steps 6 -> 3\); resume with the run's own settings"):
        _check_same_run({"total_steps": 6}, {"total_steps": 3}, "last.pt", (2, 2))
