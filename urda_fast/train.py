"""The one training loop every method shares: steps, mixed precision, periodic evaluation, logs, atomic checkpoints
and bit-for-bit resume.

A *task* supplies what differs between methods:

    task.modules() -> dict[str, nn.Module]        # everything whose state a checkpoint must hold
    task.streams() -> dict[str, stream]           # resumable data streams (state_dict / load_state_dict)
    task.training_step() -> dict[str, Tensor]     # draws its batches, returns {"loss": ..., other metrics}
    task.evaluate() -> dict[str, float]           # e.g. {"clean_acc": 91.3}
    task.metric_names() -> list[str]              # optional: the keys evaluate() returns, to check select_metric
    task.after_step()                             # optional: after each optimizer step (e.g. clamp a parameter)
    task.wrap_ddp(wrap)                           # optional, see below

A SIGTERM (a scheduler's preemption, ``kill``) or Ctrl-C during ``fit`` lets the current step finish, writes
``last.pt`` at it and then stops (SystemExit(143) / KeyboardInterrupt): ``--resume`` continues bit for bit without
redoing a step. A second Ctrl-C stops at once (a second SIGTERM is ignored). Under DDP, rank 0's signal decides, at
the next logging step. A non-finite training loss stops the run at the logging step that reads it
(FloatingPointError), except under fp16; non-finite weights are never checkpointed.
A fresh run (no ``resume``) in a folder holding a run's checkpoints is an error unless ``overwrite``, which first
removes that run's files (``RUN_FILES``: checkpoints, log.csv, TensorBoard events), so that nothing of it can pass
for the new run's. ``select_metric`` must be one of the task's evaluation metrics: checked before any work when the
task has ``metric_names()``, else at the first evaluation -- never a run whose best.pt is silently never written.
A resumed run refuses input files (``extra["inputs"]``, see ``input_fingerprints``) that changed since it started.
Those, the atomic checkpoint writes, the folder's lock and the logs are in ``urda_fast.run_files``.

Logs: ``log.csv`` and, unless ``LoopSettings.tensorboard`` is off, TensorBoard scalars in ``out_dir/tb`` (``train/*``
every ``log_every`` steps, ``eval/*`` at every evaluation). A resumed run drops what a killed run logged past its last
checkpoint from both, so no step appears twice.

Data-parallel (under ``torchrun``, see ``urda_fast.distributed``): every rank runs this loop in lockstep. DDP only
averages gradients for forwards that go through its wrapper, and only the task knows which module its training step
calls (a UDA method's training step, a DART student but not its frozen teacher), so a task may implement
``wrap_ddp(wrap)``: route its training forwards through ``wrap(module)``; ``fit`` calls it with a DDP wrapper at the
start and with the identity at the end. A task without it gets rank 0's weights copied to every rank and its
gradients averaged after each backward instead (same result, no overlap of communication with the backward).
Each rank's streams must draw its own share of the data (``make_loader(rank=, world_size=)``); logged metrics are
averaged over ranks; ``evaluate()`` runs on rank 0 only and its result is shared; rank 0 alone writes files; every
rank resumes from the same ``last.pt``, so ``out_dir`` must be on a filesystem all ranks see.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from urda_fast import distributed
from urda_fast.files import load_torch_file, run_checkpoint, state_dict_mismatch
from urda_fast.profiling import nvtx_range
from urda_fast.run_files import (
    CsvLog,
    RunLock,
    TensorBoardLog,
    atomic_save,
    remove_earlier_run,
    remove_stale_temporaries,
)

CHECKPOINT_VERSION = 1
AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class LoopSettings:
    iterations: int
    out_dir: str
    eval_every: int = 500
    save_every: int = 0  # 0: at every evaluation
    select_metric: str = "clean_acc"  # best.pt keeps the highest value of this evaluation metric
    resume: bool = False
    overwrite: bool = False  # a fresh run may replace the checkpoints of an earlier run in out_dir
    amp: str = "none"  # "none" | "bf16" | "fp16"
    progress: bool = True
    stop_after: int | None = None  # end the run after this iteration (as a kill would), for resume tests
    log_every: int = 10
    tensorboard: bool = True  # TensorBoard scalars in out_dir/tb beside log.csv
    # cuDNN times its convolution algorithms on the first batch of each shape and keeps the fastest, as tllib's and
    # the methods' scripts set it: a training step's shapes never change. Off: algorithms chosen by heuristics, the
    # same in every process (one condition of a bit-for-bit resume on a GPU). Set for the loop's duration only.
    cudnn_benchmark: bool = True

    def __post_init__(self):
        # Checked before any data is read or a progress bar drawn: `--iterations -3` would otherwise "finish" at once
        # with nothing trained, and a bad --amp would fail only at the first step.
        for name, least in (("iterations", 1), ("eval_every", 1), ("save_every", 0), ("log_every", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"urda_fast: {name} must be >= {least}, got {getattr(self, name)}")
        if self.stop_after is not None and self.stop_after < 1:  # min(iterations, -1): a run that does nothing
            raise ValueError(f"urda_fast: stop_after must be >= 1 (or unset: never), got {self.stop_after}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"urda_fast: amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.resume and self.overwrite:  # one would silently win over the other
            raise ValueError("urda_fast: --resume continues the run in the output folder and --overwrite deletes it: "
                             "give one of them")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def amp_autocast(amp: str, device_type: str):
    """The autocast context of an ``amp`` mode (``AMP_MODES``): none, bf16 or fp16 on ``device_type``."""
    if amp == "none":
        return torch.autocast(device_type, enabled=False)
    if amp not in AMP_MODES:
        raise ValueError(f"urda_fast: amp must be one of {AMP_MODES}, got {amp!r}")
    return torch.autocast(device_type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def fit(task, optimizer, scheduler, settings: LoopSettings, *, device: torch.device, extra: dict | None = None) -> dict:
    """Train ``task`` for ``settings.iterations`` steps; returns {"best": metrics of best.pt, "last": last metrics,
    "seconds"} (the same on every rank).

    ``extra`` is stored in every checkpoint (e.g. the model spec and config needed to rebuild the model).
    Under torchrun this joins the process group, and leaves it at the end, unless the caller joined it first."""
    check_select_metric(task, settings.select_metric)  # before any file is touched
    joined = distributed.setup(device)
    lock = RunLock(settings.out_dir)
    try:
        ctx = distributed.context()
        _lock_run(lock, settings.out_dir, ctx)
        return _fit(task, optimizer, scheduler, settings, device, extra or {}, ctx)
    finally:
        lock.release()
        distributed.teardown(joined)


def _saved_by_rank_0(save, ctx) -> None:
    """Rank 0 runs ``save``; under DDP the other ranks wait until it is done, and raise too if it failed. Ranks that
    went on would read a checkpoint still being written, or, stopping on a signal, exit first: torchrun then ends the
    whole run, rank 0 in the middle of the save the signal asked for."""
    error = failure = None
    if ctx.is_main:
        try:
            save()
        except Exception as err:
            if not ctx.enabled:
                raise
            error, failure = f"{type(err).__name__}: {err}", err
    if ctx.enabled:
        error = distributed.broadcast_object(error)
    if error is not None:
        if failure is not None:
            raise failure
        raise RuntimeError(f"urda_fast: rank 0 could not save a checkpoint ({error}); every rank stops with it")


def _lock_run(lock: RunLock, out_dir: str, ctx) -> None:
    """Rank 0 takes the folder's lock (and, holding it, removes killed saves' temporary files); every rank raises
    alike when another run holds it. Creating the folder and the lock file also shows at once that it is writable."""
    holder = error = None
    if ctx.is_main:
        try:
            os.makedirs(out_dir, exist_ok=True)
            holder = lock.acquire()
        except OSError as err:  # said on every rank, which would otherwise wait for rank 0 forever
            error = f"{type(err).__name__}: {err}"
        if holder is None and error is None:
            remove_stale_temporaries(out_dir)
    if ctx.enabled:
        holder, error = distributed.broadcast_object((holder, error))
    if error is not None:
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise FileExistsError(f"urda_fast: the run folder {out_dir} is a file; give another --out")
        raise PermissionError(f"urda_fast: cannot write the run folder {out_dir} ({error}); check its permissions, "
                              "or give another --out")
    if holder is not None:
        raise ValueError(f"urda_fast: {out_dir} is in use by another run ({holder}); two runs writing one folder "
                         "would replace each other's checkpoints: wait for it to end, or give another --out")


def _resume_state(path: str, ctx) -> dict | None:
    """The checkpoint to resume from; rank 0 decides whether there is one, every rank reads the same file."""
    exists = os.path.isfile(path)
    if ctx.enabled and distributed.broadcast_object(exists) != exists:
        what = f"cannot see {path}, which rank 0 resumes from" if not exists else f"sees {path}, rank 0 does not"
        raise FileNotFoundError(f"urda_fast: rank {ctx.rank} {what}: out_dir must be on a filesystem every rank "
                                f"shares")
    if not exists:
        return None
    state = load_torch_file(path, who="urda_fast resume")
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"urda_fast: {path} was written by another checkpoint version")
    return state


def _refuse_earlier_run(last_path: str, best_path: str, ctx, resume: bool, config: dict | None,
                        first_save: int) -> None:
    """A fresh run in a folder that holds a run's checkpoints would replace them at its first evaluation: the
    relaunch of a preempted job without --resume would lose it. Rank 0 looks; every rank raises alike. With
    --resume and a best.pt but no last.pt written with these settings, the run starts from the beginning when
    best.pt is no later than ``first_save``, the first last.pt's iteration (a run killed between the two files of
    its first checkpoint: it would write the same best.pt again); a later best.pt means a last.pt was lost."""
    found = [path for path in (last_path, best_path) if os.path.isfile(path)]
    written_at = _same_run(best_path, config) if resume and found == [best_path] and ctx.is_main else None
    restart = written_at is not None and written_at <= first_save
    if ctx.enabled:
        found, restart = distributed.broadcast_object((found, restart))
    if restart:
        distributed.warn_main(f"urda_fast: --resume: {best_path} but no last.pt (the run was killed before its "
                              "first checkpoint was complete): starting from the beginning")
        return
    if found:
        where = os.path.dirname(found[0]) or "."
        if resume:  # only best.pt: nothing to continue from
            raise ValueError(f"urda_fast: {where} holds an earlier run's best.pt but no last.pt to resume from (a "
                             "run with other settings, or one whose last.pt was removed); --overwrite starts over "
                             "in its place, or give another --out")
        raise ValueError(f"urda_fast: {where} holds an earlier run's {' and '.join(map(os.path.basename, found))}; "
                         "pass --resume to continue it, --overwrite to start over in its place, or another --out")


def _same_run(best_path: str, config: dict | None) -> int | None:
    """The iteration of ``best_path`` if a run with these settings (those a resume may not change) wrote it, else
    None."""
    try:
        saved = load_torch_file(best_path, who="urda_fast resume", mmap=True)
        if not (config and isinstance(saved, dict) and saved.get("config")):
            return None  # nothing to compare: not known to be this run's
        _check_same_run(saved["config"], config, best_path)
    except ValueError:
        return None
    return int(saved.get("iteration", 0))


def _newer_best(best_path: str, best: dict | None, iteration: int, ctx) -> dict | None:
    """The run's best record at a resume from ``iteration``: a kill after best.pt but before last.pt leaves a
    best.pt newer than the checkpoint, whose record is then the best (the replayed evaluation ties it, and must not
    count as better; with another --eval-every it is not even replayed)."""
    newer = None
    if ctx.is_main and os.path.isfile(best_path):
        saved = load_torch_file(best_path, who="urda_fast resume", mmap=True)
        if isinstance(saved, dict) and saved.get("iteration", 0) > iteration and isinstance(saved.get("metrics"),
                                                                                              dict):
            newer = dict(saved["metrics"], iteration=saved["iteration"])
    if ctx.enabled:
        newer = distributed.broadcast_object(newer)
    return best if newer is None else newer


# What a resumed run may change: where and how it runs and reports, how far it goes, and where its dataset lies (a
# moved copy of the same files). Any other setting (lr, batch size, loss weights, attack, seed, which data, model)
# would continue the checkpoint as a different run than it started.
RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "progress", "nvtx", "tensorboard", "device", "stop_after",
                               "out", "iterations", "epochs", "eval_every", "eval_max_batches", "num_workers",
                               "compile", "root", "world", "cudnn_benchmark"})


# Input checkpoints, as a path (DART's teacher) or "ARCH:PATH" (HPT's CLIPs): the same file written another way
# (`T1`, `./T1`, `T1/best.pt`, its absolute path) is the same setting; their contents are fingerprinted apart.
CHECKPOINT_PATHS, MODEL_ARGS = frozenset({"teacher"}), frozenset({"target", "proxy", "anchor"})


def _same_setting(key: str, old, new) -> bool:
    if old == new:
        return True
    if not (isinstance(old, str) and isinstance(new, str) and old and new):
        return False
    if key in MODEL_ARGS:
        (old_arch, _, old), (new_arch, _, new) = old.partition(":"), new.partition(":")
        if old_arch != new_arch or not (old and new):
            return False
    elif key not in CHECKPOINT_PATHS:
        return False
    return os.path.realpath(run_checkpoint(old)) == os.path.realpath(run_checkpoint(new))


def _check_same_run(saved: dict | None, now: dict | None, path: str, worlds: tuple[int, int] = (1, 1)) -> None:
    if not saved or not now:
        return
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in sorted(set(saved) & set(now) - RESUMABLE_CHANGES)
               if not _same_setting(k, saved[k], now[k])]
    if changed:
        # a run whose length is given in epochs has as many steps as the global batch takes to cover them
        why = (f" (written by {worlds[0]} process{'es' * (worlds[0] > 1)}, resumed by {worlds[1]}: an epoch is "
               "another number of steps; resume with as many processes)" if worlds[0] != worlds[1] and any(
                   c.startswith("total_steps ") for c in changed) else "")
        raise ValueError(f"urda_fast: --resume from {path}, written with other settings ({', '.join(changed[:6])}"
                         f"{', ...' if len(changed) > 6 else ''}){why}; resume with the run's own settings, or start "
                         "a new run in another --out folder")


def _check_same_inputs(saved: dict | None, now: dict | None, path: str) -> None:
    """The input checkpoints (``input_fingerprints``) the run began with against today's files at the same paths."""
    for flag in sorted(set(saved or {}) & set(now or {})):
        before, after = saved[flag], now[flag]
        if (before.get("size"), before.get("sha256")) != (after.get("size"), after.get("sha256")):
            what = f"size {before.get('size')} -> {after.get('size')} bytes" if before.get("size") != after.get(
                "size") else "same size, other content"
            raise ValueError(f"urda_fast: --resume from {path}: {flag} {after.get('path')!r} has changed since the "
                             f"run began ({what}); the run would continue with other weights or data than it "
                             "started with. Put the run's own file back, or start a new run in another --out folder")


def _restore(state, task, optimizer, scheduler, scaler, ctx, path, config=None, inputs=None, amp=None) -> None:
    modules = task.modules()
    if set(state["modules"]) != set(modules):
        raise ValueError(f"urda_fast: {path} holds {sorted(state['modules'])}, this run has "
                         f"{sorted(modules)}: it is from another method")
    if state.get("amp", amp) != amp:  # "auto" resolves by device: a resume on another device may change it
        raise ValueError(f"urda_fast: --resume from {path}, trained with amp {state['amp']!r}, now {amp!r} (a "
                         f"resume on another kind of device?); resume with --amp {state['amp']}")
    _check_same_run(state.get("config"), config, path, (state.get("world_size", 1), ctx.world_size))
    _check_same_inputs(state.get("inputs"), inputs, path)
    for name, module in modules.items():
        try:
            module.load_state_dict(state["modules"][name])
        except RuntimeError as err:  # the same method on another model (a setting its saved config predates)
            raise ValueError(f"urda_fast: --resume from {path}: its {name!r} weights are another model's than this "
                             f"run builds ({state_dict_mismatch(err)}); resume with the settings the run was started "
                             "with, or start a new run in another --out folder") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    for name, stream in task.streams().items():
        stream.load_state_dict(state["streams"][name])  # a stream converts positions to another world size
    rngs = state.get("rng_ranks")
    if ctx.enabled and rngs is not None and len(rngs) == ctx.world_size:
        set_rng_state(rngs[ctx.rank])
    else:
        set_rng_state(state["rng"])
        distributed.seed_rank(ctx.rank)
    if state.get("world_size", 1) != ctx.world_size:
        distributed.warn_main(f"urda_fast: resuming a {state.get('world_size', 1)}-process run with "
                              f"{ctx.world_size} processes: it continues, but not bit-for-bit")


def _metric_values(metrics: dict) -> dict:
    """The step's metrics as floats, the tensors read in one transfer (one host sync on a GPU, not one per metric)."""
    names = [k for k, v in metrics.items() if torch.is_tensor(v)]
    read = torch.stack([metrics[k].detach().reshape(()).double() for k in names]).tolist() if names else []
    return {k: read[names.index(k)] if k in names else float(v) for k, v in metrics.items()}


def _check_finite_loss(loss: float, iteration: int, settings: LoopSettings, last_path: str, saved_at: int) -> None:
    """Read where the loop reads the loss anyway (its logging steps: no extra host sync). A NaN / inf loss poisons
    the weights at its backward; stopping keeps hours of GPU time from training NaNs. fp16 is exempt: there the
    GradScaler skips the steps whose gradients overflow, and an overflowing loss now and then is part of that."""
    if math.isfinite(loss) or settings.amp == "fp16":
        return
    last = f"{last_path} holds iteration {saved_at}" if saved_at else "no checkpoint was written yet"
    raise FloatingPointError(f"urda_fast: the training loss is {loss} at iteration {iteration} ({last}); check the "
                             "data for NaN/inf, or run again with a lower learning rate or --amp none")


def _check_finite_weights(task, iteration: int, last_path: str, saved_at: int) -> None:
    """Before a checkpoint: a NaN / inf weight (a non-finite loss between logging steps) must not replace the last
    good last.pt. One host read per device, at checkpoints only."""
    by_device: dict = {}
    for module in task.modules().values():
        for p in module.parameters():
            if p.is_floating_point():
                by_device.setdefault(p.device, []).append(torch.isfinite(p.detach()).all())
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return
    last = f"{last_path} holds iteration {saved_at}" if saved_at else "no checkpoint was written yet"
    raise FloatingPointError(f"urda_fast: the weights are not finite at iteration {iteration}, so they were not saved "
                             f"({last}); check the data for NaN/inf, or run again with a lower learning rate or "
                             "--amp none")


class _StopOnSignal:
    """Between ``install()`` and ``restore()`` (main thread only), SIGTERM and SIGINT set ``signum`` instead of
    stopping the process; the loop saves and stops at the end of the step. A second Ctrl-C (SIGINT) gets the previous
    handler's behaviour at once; a second SIGTERM is ignored: under torchrun a scheduler's SIGTERM reaches each
    worker twice (directly and forwarded by the agent), and schedulers send SIGKILL after their grace period."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum, self._previous = None, {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum != signal.SIGINT:
                return
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        tqdm.write(f"urda_fast: {signal.Signals(signum).name} received: finishing this step to save last.pt (Ctrl-C "
                   "again stops at once)", file=sys.stderr)

    @staticmethod
    def stop(signum: int, iteration: int, path: str):
        message = (f"urda_fast: stopped by {signal.Signals(signum).name} after iteration {iteration}; {path} holds "
                   "it: --resume continues")
        tqdm.write(message, file=sys.stderr)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt(message)
        raise SystemExit(128 + signum)


def _distribute(task, optimizer, device, ctx):
    """Under DDP: route the task's training forward through DDP, or return the after-backward gradient averaging
    for a task that cannot (see the module docstring). None when DDP does the work or there is one process."""
    if not ctx.enabled:
        return None
    if hasattr(task, "wrap_ddp"):
        task.wrap_ddp(distributed.ddp_wrapper(device))
        return None
    distributed.broadcast_modules(task.modules().values())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return lambda: distributed.average_gradients(params)


def check_select_metric(task, select_metric: str) -> None:
    """A ValueError naming the valid metrics when ``select_metric`` is not among the task's ``metric_names()`` (a
    task without it is checked at its first evaluation instead): best.pt would never be written."""
    names = getattr(task, "metric_names", None)
    if names is not None:
        require_metric(select_metric, list(names()))


def require_metric(select_metric: str, names) -> None:
    if select_metric not in names:
        raise ValueError(f"urda_fast: select_metric {select_metric!r} is not one of this run's evaluation metrics "
                         f"({', '.join(names)}): best.pt keeps the best value of one of them")


def _fit(task, optimizer, scheduler, settings, device, extra, ctx) -> dict:
    main = ctx.is_main  # only rank 0 writes files
    last_path = os.path.join(settings.out_dir, "last.pt")
    best_path = os.path.join(settings.out_dir, "best.pt")
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == "fp16")
    start, best, last_metrics = 0, None, {}
    save_every = settings.save_every or settings.eval_every  # 0: at every evaluation
    state = _resume_state(last_path, ctx) if settings.resume else None
    if state is None and not settings.overwrite:
        _refuse_earlier_run(last_path, best_path, ctx, settings.resume, extra.get("config"),
                            min(save_every, settings.iterations))
    if state is None and main:
        # --overwrite, or what a run killed before its first checkpoint left (its log.csv, its TensorBoard events
        # that TensorBoard's purge hides but other readers of the folder would mix with this run's)
        remove_earlier_run(settings.out_dir)
    if state is not None:
        _restore(state, task, optimizer, scheduler, scaler, ctx, last_path, extra.get("config"), extra.get("inputs"),
                 settings.amp)
        start, best, last_metrics = state["iteration"], state["best"], state["metrics"]
        best = _newer_best(best_path, best, start, ctx)
    elif ctx.enabled:
        distributed.seed_rank(ctx.rank)
    del state
    log = CsvLog(os.path.join(settings.out_dir, "log.csv"), start if settings.resume else None) if main else None
    tb = TensorBoardLog(os.path.join(settings.out_dir, "tb"), start) if main and settings.tensorboard else None

    def record(group, iteration, values):
        if main:
            prefix = "eval_" if group == "eval" else ""
            log.append({"iteration": iteration, **{prefix + k: v for k, v in values.items()}})
            if tb is not None:
                tb.append(group, iteration, values)

    def checkpoint(iteration):
        # Every rank (their weights are the same): a raise on rank 0 alone would leave the others in the gather
        _check_finite_weights(task, iteration, last_path, saved_at)
        rngs = distributed.gather_objects(rng_state()) if ctx.enabled else None  # a collective: every rank joins

        def save():
            # The logs first: rows past the checkpoint are dropped at a resume, rows missing from them never come back
            log.flush()
            if tb is not None:
                tb.flush()
            atomic_save({
                **extra, "version": CHECKPOINT_VERSION, "iteration": iteration, "best": best, "metrics": last_metrics,
                "amp": settings.amp,
                "modules": {name: m.state_dict() for name, m in task.modules().items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "streams": {name: s.state_dict() for name, s in task.streams().items()},
                "rng": rng_state(), "world_size": ctx.world_size, **({"rng_ranks": rngs} if rngs is not None else {}),
            }, last_path)

        _saved_by_rank_0(save, ctx)

    end = settings.iterations if settings.stop_after is None else min(settings.iterations, settings.stop_after)
    bar = tqdm(range(start + 1, end + 1), initial=start, total=settings.iterations,
               disable=not (settings.progress and main), desc=getattr(task, "name", "train"))
    sync_gradients = _distribute(task, optimizer, device, ctx)
    after_step = getattr(task, "after_step", None)
    stop_request = _StopOnSignal()
    saved_at = start
    tic = time.perf_counter()
    cudnn_benchmark = torch.backends.cudnn.benchmark
    try:
        stop_request.install()
        torch.backends.cudnn.benchmark = settings.cudnn_benchmark
        for iteration in bar:
            with nvtx_range(f"step {iteration}"):
                if ctx.enabled:  # rank 0's BatchNorm statistics for the step's eval-mode forwards (the attack)
                    distributed.broadcast_buffers(task.modules().values())
                with amp_autocast(settings.amp, device.type):
                    metrics = task.training_step()
                with nvtx_range("backward"):
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(metrics["loss"]).backward()
                    if sync_gradients is not None:
                        sync_gradients()
                with nvtx_range("optimizer"):
                    lr = optimizer.param_groups[0]["lr"]  # the step's own; scheduler.step() sets the next one's
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    if after_step is not None:
                        after_step()
            if iteration % settings.log_every == 0 or iteration == settings.iterations:
                values = _metric_values(metrics)
                if ctx.enabled:
                    values = distributed.mean_metrics(values)  # the metrics of the whole W*B batch
                record("train", iteration, {"lr": lr, **values})
                bar.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k.endswith("loss")})
                _check_finite_loss(values["loss"], iteration, settings, last_path, saved_at)
            if iteration % settings.eval_every == 0 or iteration == settings.iterations:
                with nvtx_range("evaluate"):
                    # rank 0's weights are every rank's; its buffers (BN statistics) are the checkpointed ones
                    last_metrics = task.evaluate() if main else None
                if ctx.enabled:
                    last_metrics = distributed.broadcast_object(last_metrics)
                record("eval", iteration, last_metrics)
                require_metric(settings.select_metric, list(last_metrics))
                score = last_metrics[settings.select_metric]
                if best is None or score > best[settings.select_metric]:
                    best = dict(last_metrics, iteration=iteration)
                    _saved_by_rank_0(lambda: atomic_save({
                        **extra, "version": CHECKPOINT_VERSION, "iteration": iteration, "metrics": last_metrics,
                        "modules": {name: m.state_dict() for name, m in task.modules().items()}}, best_path), ctx)
            saved = iteration % save_every == 0 or iteration == end
            if saved:
                checkpoint(iteration)
                saved_at = iteration
            signum = stop_request.signum
            if ctx.enabled:  # every rank must stop at the same step: rank 0 decides, where ranks meet anyway
                signum = distributed.broadcast_object(signum) if iteration % settings.log_every == 0 else None
            if signum is not None and iteration < end:  # at the last step the run is complete: it ends as usual
                if not saved:
                    checkpoint(iteration)
                _StopOnSignal.stop(signum, iteration, last_path)
        if ctx.enabled:  # the last step's BatchNorm statistics were each rank's own: rank 0's, checkpointed, on all
            distributed.broadcast_buffers(task.modules().values())
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        stop_request.restore()
        bar.close()
        if tb is not None:
            tb.close()
        if ctx.enabled and hasattr(task, "wrap_ddp"):
            task.wrap_ddp(lambda module: module)  # plain forwards again: the process group may be gone after fit
    return {"best": best, "last": last_metrics, "seconds": time.perf_counter() - tic}
