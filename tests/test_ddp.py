"""Data-parallel training: a 2-process gloo run under torchrun trains like one process with twice the batch.

Why the comparison can be tight. The sampler shards each epoch by stride (rank r takes positions r, r+2, ...), so at
every step the two ranks' batches of B are together exactly the batch of 2B one process draws, and in that batch
rank r's samples sit at rows r, r+2, ... Losses are batch means and DDP averages gradients, so the gradients agree --
except through BatchNorm, which under DDP normalises each rank's B samples by their own statistics (SyncBatchNorm
has no CPU kernels, and per-device statistics are also what the papers' single-GPU recipes use). The reference run
therefore swaps BatchNorm's forward for the rank-wise one: rows r, r+2, ... normalised together, and running
statistics updated from rank 0's rows only, since DDP broadcasts rank 0's buffers and rank 0 writes the checkpoint.
Then the two runs differ only by float summation order; plain BatchNorm over all 2B rows is far outside the
tolerance (checked too, so the tolerance means something).

Run as a script (``torchrun --nproc_per_node=2 tests/test_ddp.py OUT``) it is the worker of the runs compared here.
"""

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD, BATCH = 2, 8  # processes, batch per process
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def pretrain_cfg(out, **kw):
    from urda_fast.dart import PretrainConfig

    options = dict(data="digits", method="source-only", out=str(out), iterations=3, batch_size=BATCH,
                   eval_every=100, bottleneck_dim=32, progress=False, device="cpu")
    return PretrainConfig(**{**options, **kw})


def robustify_cfg(teacher, out, **kw):
    from urda_fast.dart import RobustifyConfig

    options = dict(data="digits", teacher=str(teacher), out=str(out), iterations=2, batch_size=BATCH, eval_every=100,
                   attack_steps=1, attack_eps=0.1, attack_alpha=0.05, progress=False, device="cpu")
    return RobustifyConfig(**{**options, **kw})


# Losses normalised by a batch-wide sum: CDAN+E's weights sum to the batch size, the pseudo-label loss is a mean over
# the confident target samples (some kept, some not, at this threshold and step count).
CDAN_E = dict(method="cdan", entropy_conditioning=True)
VAT_TARGET = dict(vat=True, vat_target=True, vat_steps=1, vat_threshold=0.13, iterations=6)


@contextlib.contextmanager
def no_random_start():
    """PGD without its random start in pretraining's VAT (the ranks draw other noise than one process would)."""
    module = sys.modules["urda_fast.dart.pretrain"]  # urda_fast.dart.pretrain is also the function's name
    pgd = module.PGD
    module.PGD = lambda *args, **kw: pgd(*args, **kw, random_start=False)
    try:
        yield
    finally:
        module.PGD = pgd


def hpt_cfg(world, out, **kw):
    from urda_fast.hpt import TrainConfig

    # KL summed over the batch (the code's): the rank-averaged gradients must be scaled back to the global sum.
    options = dict(target=world.model_arg("target"), proxy=world.model_arg("proxy"), train_data="world",
                   world=world.folder, out=str(out), method="hpt-gpd", iterations=3, warmup_steps=1, lr=1e-3,
                   batch_size=BATCH, attack_steps=2, attack_random_start=False, logits="clip", kl_reduction="sum",
                   eval_every=100, eval_steps=1, eval_max_batches=1, progress=False, device="cpu", tensorboard=False)
    return TrainConfig(**{**options, **kw})


# ----------------------------------------------------------------------------------------------- torchrun worker


def worker(out):
    import test_train  # tests/ is this script's folder
    import urda_fast.dart.common as common
    import urda_fast.train as train_module
    from urda_fast import distributed
    from urda_fast.dart import pretrain, robustify
    from urda_fast.train import fit

    rank = distributed.context().rank

    def fit_saving_each_rank(task, optimizer, scheduler, settings, **kw):  # only rank 0 writes checkpoints
        result = fit(task, optimizer, scheduler, settings, **kw)
        params = {name: m.state_dict() for name, m in task.modules().items()}  # buffers too (BatchNorm's)
        torch.save(params, os.path.join(settings.out_dir, f"params_rank{rank}.pt"))
        return result

    common.fit = test_train.fit = fit_saving_each_rank
    pretrain(pretrain_cfg(f"{out}/pretrain"))
    pretrain(pretrain_cfg(f"{out}/resumed", stop_after=2))  # each fit joins and leaves the process group
    pretrain(pretrain_cfg(f"{out}/resumed", resume=True))
    pretrain(pretrain_cfg(f"{out}/cdan-e", **CDAN_E))
    with no_random_start():
        pretrain(pretrain_cfg(f"{out}/vat-target", **VAT_TARGET))
    for forward in ("split-bn", "separate"):  # one student forward of clean+adversarial, or two before a backward
        robustify(robustify_cfg(f"{out}/pretrain/best.pt", f"{out}/dart-{forward}", forward=forward))
    code = dict(forward="separate", weighting="code", iterations=3)  # the code's loss: batch-mean KL * summed weight
    robustify(robustify_cfg(f"{out}/pretrain/best.pt", f"{out}/dart-code", **code))
    robustify(robustify_cfg(f"{out}/pretrain/best.pt", f"{out}/dart-code-resumed", **code, stop_after=2))
    robustify(robustify_cfg(f"{out}/pretrain/best.pt", f"{out}/dart-code-resumed", **code, resume=True))
    # Rank 0's saves take a while here: every rank reads last.pt as soon as fit returns or stops, and must find the
    # step it ended at (the others went on while rank 0 wrote: a stale or missing file; and under a signal torchrun
    # ended rank 0 mid-save when they exited first).
    fast_save = train_module.atomic_save
    if rank == 0:
        train_module.atomic_save = lambda obj, path: (time.sleep(1.0), fast_save(obj, path))
    test_train.run(f"{out}/linear", iterations=4, batch_size=BATCH // 2, rank=rank, world_size=WORLD)  # no wrap_ddp
    with open(f"{out}/linear/seen_rank{rank}", "w") as f:
        f.write(str(torch.load(f"{out}/linear/last.pt", weights_only=False)["iteration"]))
    # A SIGTERM to rank 0 alone in step 2 (no checkpoint due there): both ranks save step 2 and stop together.
    try:
        test_train.run(f"{out}/signalled", iterations=4, batch_size=BATCH // 2, rank=rank, world_size=WORLD,
                       signal_at=(2, signal.SIGTERM) if rank == 0 else None)
    except SystemExit as stop:
        with open(f"{out}/signalled/stopped_rank{rank}", "w") as f:
            f.write(f"{stop.code} {torch.load(f'{out}/signalled/last.pt', weights_only=False)['iteration']}")
    if rank == 0:  # a save failing on rank 0 alone stops every rank (the others waited for it until the timeout)
        train_module.atomic_save = lambda obj, path: (_ for _ in ()).throw(OSError(28, "No space left on device"))
    try:
        test_train.run(f"{out}/unwritable", iterations=2, batch_size=BATCH // 2, rank=rank, world_size=WORLD)
    except Exception as err:
        with open(f"{out}/unwritable_rank{rank}", "w") as f:
            f.write(f"{type(err).__name__}: {err}")
    train_module.atomic_save = fast_save
    test_train.run(f"{out}/signalled", iterations=4, batch_size=BATCH // 2, rank=rank, world_size=WORLD, resume=True)
    from urda_fast.hpt import World, train as hpt_train

    hpt_train(hpt_cfg(World(f"{out}/world"), f"{out}/hpt"))  # no wrap_ddp either: gradients averaged after backward


# ------------------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    from urda_fast.hpt.world import WorldRecipe, build_world

    build_world(str(out / "world"), WorldRecipe().scaled(0.02), progress=False)  # before the ranks share it
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    # its own session, so a timeout can end torchrun's workers too, by their process group
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={WORLD}", os.path.abspath(__file__), str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, f"torchrun failed:\n{stdout[-4000:]}\n{stderr[-6000:]}"
    return out


@contextlib.contextmanager
def rankwise_batchnorm(world=WORLD):
    """Training-mode BatchNorm as ``world`` DDP ranks compute it when rank r holds rows r, r+world, ... (above)."""
    base = torch.nn.modules.batchnorm._BatchNorm
    original = base.forward

    def forward(self, x):
        if not self.training:
            return original(self, x)
        self.num_batches_tracked.add_(1)
        outs = [F.batch_norm(x[r::world], self.running_mean if r == 0 else None, self.running_var if r == 0 else None,
                             self.weight, self.bias, True, self.momentum, self.eps) for r in range(world)]
        return torch.stack(outs, dim=1).flatten(0, 1)  # rows back in their interleaved order

    base.forward = forward
    try:
        yield
    finally:
        base.forward = original


def checkpoint(folder):
    return torch.load(os.path.join(folder, "last.pt"), weights_only=False)


def log_rows(folder):
    with open(os.path.join(folder, "log.csv"), newline="") as f:
        return list(csv.DictReader(f))


def assert_states_close(a, b, **tolerance):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), msg=key, **(tolerance or TOLERANCE))


def max_difference(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


def test_ddp_pretrain_equals_one_process_with_twice_the_batch(ddp_runs, tmp_path):
    from urda_fast.dart import pretrain

    with rankwise_batchnorm():
        single = pretrain(pretrain_cfg(tmp_path / "single", batch_size=WORLD * BATCH))
    ddp = checkpoint(ddp_runs / "pretrain")
    reference = checkpoint(tmp_path / "single")
    assert ddp["world_size"] == WORLD and len(ddp["rng_ranks"]) == WORLD
    assert_states_close(ddp["modules"]["method"], reference["modules"]["method"])  # weights and BN buffers
    assert ddp["streams"] == {name: dict(s, position=s["position"] // WORLD, world_size=WORLD)
                              for name, s in reference["streams"].items()}
    # logged metrics are averaged over ranks: the whole 2B batch's, as in the single run
    for ours, theirs in zip(log_rows(ddp_runs / "pretrain"), log_rows(tmp_path / "single"), strict=True):
        assert ours.keys() == theirs.keys()
        for key in ours:
            if ours[key] and key != "eval_clean_acc":
                assert float(ours[key]) == pytest.approx(float(theirs[key]), rel=1e-4, abs=1e-5), key
    assert ddp["metrics"]["clean_acc"] == pytest.approx(single["last"]["clean_acc"], abs=0.5)

    # The tolerance is meaningful: BatchNorm over all 2B rows at once lands far outside it.
    pretrain(pretrain_cfg(tmp_path / "plain-bn", batch_size=WORLD * BATCH))
    plain = checkpoint(tmp_path / "plain-bn")["modules"]["method"]
    assert max_difference(plain, ddp["modules"]["method"]) > 100 * max_difference(
        reference["modules"]["method"], ddp["modules"]["method"]) + 1e-4


@pytest.mark.parametrize("run, options", [("cdan-e", CDAN_E), ("vat-target", VAT_TARGET)])
def test_ddp_batch_normalised_losses_use_the_global_batch(ddp_runs, tmp_path, run, options):
    """Weights summing to each rank's batch, or a mean over each rank's kept samples, would train otherwise than one
    process of the global batch."""
    from urda_fast.dart import pretrain

    with rankwise_batchnorm(), no_random_start():
        pretrain(pretrain_cfg(tmp_path / run, batch_size=WORLD * BATCH, **options))
    assert_states_close(checkpoint(ddp_runs / run)["modules"]["method"], checkpoint(tmp_path / run)["modules"]["method"])
    if run == "vat-target":
        kept = float(log_rows(tmp_path / run)[0]["pseudo_kept"])  # the training row (the eval row follows)
        assert 0 < kept < 1, kept  # the mean over the kept samples is tested only when some, not all, were kept


def test_ddp_ranks_hold_the_same_weights(ddp_runs):
    for run in ("pretrain", "resumed", "cdan-e", "vat-target", "dart-split-bn", "dart-separate", "linear"):
        rank0, rank1 = (torch.load(ddp_runs / run / f"params_rank{r}.pt") for r in range(WORLD))
        for name in rank0:
            assert_states_close(rank0[name], rank1[name], rtol=0, atol=0)


def test_ddp_resume_after_kill_equals_the_uninterrupted_run(ddp_runs):
    full, resumed = checkpoint(ddp_runs / "pretrain"), checkpoint(ddp_runs / "resumed")
    assert_states_close(full["modules"]["method"], resumed["modules"]["method"], rtol=0, atol=0)
    assert full["streams"] == resumed["streams"]
    assert len(log_rows(ddp_runs / "resumed")) == len(log_rows(ddp_runs / "pretrain"))


def test_ddp_robustify_trains_the_student_only(ddp_runs):
    for forward in ("split-bn", "separate"):
        state = checkpoint(ddp_runs / f"dart-{forward}")
        assert set(state["modules"]) == {"student"} and state["iteration"] == 2
        assert all(torch.isfinite(v.float()).all() for v in state["modules"]["student"].values())


def test_ddp_robustify_equals_one_process_with_twice_the_batch(ddp_runs, tmp_path):
    """Three steps of the code's weighting. Its summed weight is the global batch's, and from step 2 on the attack
    (an eval-mode forward) runs on rank 0's BatchNorm statistics on every rank, as in the rank-wise reference (each
    rank's own, before they were synced at each step: the losses drifted from step 2 on)."""
    from urda_fast.dart import robustify

    with rankwise_batchnorm():
        robustify(robustify_cfg(ddp_runs / "pretrain" / "best.pt", tmp_path / "single", forward="separate",
                                weighting="code", iterations=3, batch_size=WORLD * BATCH))
    ddp, reference = checkpoint(ddp_runs / "dart-code"), checkpoint(tmp_path / "single")
    assert_states_close(ddp["modules"]["student"], reference["modules"]["student"])
    (ours,), (theirs,) = ([row for row in log_rows(folder) if row["loss"]] for folder in (ddp_runs / "dart-code",
                                                                                          tmp_path / "single"))
    for key in ("loss", "robust_loss", "transfer_loss", "feature_loss"):
        assert float(ours[key]) == pytest.approx(float(theirs[key]), rel=1e-4, abs=1e-6), key


def test_ddp_robustify_resume_equals_the_uninterrupted_run(ddp_runs):
    """Its attack runs on BatchNorm statistics, which a resume gives every rank from rank 0's checkpoint."""
    full, resumed = checkpoint(ddp_runs / "dart-code"), checkpoint(ddp_runs / "dart-code-resumed")
    assert resumed["iteration"] == 3
    assert_states_close(full["modules"]["student"], resumed["modules"]["student"], rtol=0, atol=0)


def test_task_without_ddp_hook_averages_gradients(ddp_runs, tmp_path):
    from test_train import run as run_linear

    run_linear(tmp_path / "single", iterations=4, batch_size=BATCH)  # no BatchNorm: nothing to swap
    assert_states_close(checkpoint(ddp_runs / "linear")["modules"]["model"],
                        checkpoint(tmp_path / "single")["modules"]["model"])


def test_ddp_ranks_find_the_last_checkpoint_written_when_fit_returns(ddp_runs):
    assert [(ddp_runs / "linear" / f"seen_rank{rank}").read_text() for rank in range(WORLD)] == ["4"] * WORLD


def test_ddp_save_failing_on_rank_0_stops_every_rank(ddp_runs):
    assert (ddp_runs / "unwritable_rank0").read_text() == "OSError: [Errno 28] No space left on device"
    assert (ddp_runs / "unwritable_rank1").read_text() == ("RuntimeError: urda_fast: rank 0 could not save a checkpoint "
                                                          "(OSError: [Errno 28] No space left on device); every rank "
                                                          "stops with it")


def test_ddp_signal_to_rank_0_stops_every_rank_at_one_saved_step(ddp_runs):
    for rank in range(WORLD):
        assert (ddp_runs / "signalled" / f"stopped_rank{rank}").read_text() == f"{128 + signal.SIGTERM} 2"
    for rank in range(WORLD):  # resumed from step 2: the uninterrupted run's weights, bit for bit
        signalled, linear = (torch.load(ddp_runs / run / f"params_rank{rank}.pt") for run in ("signalled", "linear"))
        assert_states_close(signalled["model"], linear["model"], rtol=0, atol=0)


def test_ddp_hpt_equals_one_process_with_twice_the_batch(ddp_runs, tmp_path):
    """A ViT target has no BatchNorm (the frozen ResNet proxy is in eval mode): nothing to emulate."""
    from urda_fast.hpt import World, train

    train(hpt_cfg(World(str(ddp_runs / "world")), tmp_path / "single", batch_size=WORLD * BATCH))
    ddp, single = checkpoint(ddp_runs / "hpt"), checkpoint(tmp_path / "single")
    assert ddp["world_size"] == WORLD and ddp["iteration"] == 3
    assert_states_close(ddp["modules"]["target"], single["modules"]["target"], rtol=1e-4, atol=1e-5)
    # the logged KL parts too (each rank's sum, logged as the rank mean times W: the global batch's sum)
    (ours,), (theirs,) = ([row for row in log_rows(folder) if row["loss"]] for folder in (ddp_runs / "hpt",
                                                                                          tmp_path / "single"))
    for key in ("loss", "proxy_loss", "anchor_loss"):
        assert float(ours[key]) == pytest.approx(float(theirs[key]), rel=1e-4, abs=1e-6), key
    start = torch.load(str(ddp_runs / "world" / "target.pt"))
    assert max_difference(start, single["modules"]["target"]) > 1e-3  # it did train


def test_collectives_wait_long_enough_for_rank_0_to_evaluate(monkeypatch):
    """The other ranks wait in a broadcast while rank 0 evaluates: NCCL's default 10 minutes ended long runs."""
    import datetime

    from urda_fast import distributed

    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.collective_timeout() == datetime.timedelta(minutes=120)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "7.5")
    assert distributed.collective_timeout() == datetime.timedelta(minutes=7.5)
    for bad in ("0", "-3", "soon", "nan", "inf"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match="URDA_FAST_DDP_TIMEOUT_MIN must be a positive number of minutes"):
            distributed.collective_timeout()


if __name__ == "__main__":
    import faulthandler

    faulthandler.dump_traceback_later(240, exit=True)  # a hung collective shows where, before the test's timeout
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    worker(sys.argv[1])


@pytest.mark.parametrize("name, visible, local_rank, expected", [
    ("cuda", 4, 2, "cuda:2"), ("auto", 4, 3, "cuda:3"), ("cuda:1", 4, 1, "cuda:1"),
    ("cuda", 1, 3, "cuda:0"),  # CUDA_VISIBLE_DEVICES set per process: its GPU is cuda:0
    ("cuda:0", 4, 1, "would put every process on GPU 0; give --device cuda"),
    ("cuda", 2, 2, "LOCAL_RANK 2 has no GPU of its own"), ("cpu", 4, 1, "cpu")])
def test_torchrun_processes_take_their_own_gpu(monkeypatch, name, visible, local_rank, expected):
    """Without a GPU here: torch.cuda's answers are stood in for, the mapping from flag to device is ours."""
    from urda_fast.distributed import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    for key, value in {"WORLD_SIZE": "4", "RANK": str(local_rank), "LOCAL_RANK": str(local_rank)}.items():
        monkeypatch.setenv(key, value)
    if expected.startswith(("cuda:", "cpu")):
        assert pick_device(name) == torch.device(expected)
    else:
        with pytest.raises(ValueError, match=expected):
            pick_device(name)


@pytest.mark.parametrize("argv", [["dart", "eval", "run"], ["dart", "demo"], ["hpt", "demo"], ["info"],
                                  ["hpt", "eval", "--datasets", "world:digits"]])
def test_commands_that_do_not_train_refuse_torchrun(monkeypatch, argv):
    """Under torchrun every process would run the whole evaluation (or demo) and write the same report files."""
    from urda_fast.cli import main

    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit, match=r"runs in one process, not under torchrun \(WORLD_SIZE=2\).*`dart pretrain`, "
                                         r"`dart robustify`, `hpt train`"):
        main(argv)


def test_a_world_size_without_rank_does_not_stop_commands_that_do_not_train(monkeypatch, capsys):
    """Some schedulers export WORLD_SIZE alone: only torchrun's pair (with RANK) means every process runs the
    command."""
    from urda_fast.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    assert main(["info"]) == 0
