"""The one training loop every method shares: steps, mixed precision, periodic evaluation, logs, atomic checkpoints
and bit-for-bit resume.

A *task* supplies what differs between methods:

    task.modules() -> dict[str, nn.Module]        # everything whose state a checkpoint must hold
    task.streams() -> dict[str, stream]           # resumable data streams (state_dict / load_state_dict)
    task.training_step() -> dict[str, Tensor]     # draws its batches, returns {"loss": ..., other metrics}
    task.evaluate() -> dict[str, float]           # e.g. {"clean_acc": 91.3}
"""

from __future__ import annotations

import csv
import os
import random
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from urda_fast.profiling import nvtx_range

CHECKPOINT_VERSION = 1


@dataclass
class LoopSettings:
    iterations: int
    out_dir: str
    eval_every: int = 500
    save_every: int = 0  # 0: at every evaluation
    select_metric: str = "clean_acc"  # best.pt keeps the highest value of this evaluation metric
    resume: bool = False
    amp: str = "none"  # "none" | "bf16" | "fp16"
    progress: bool = True
    stop_after: int | None = None  # end the run after this iteration (as a kill would), for resume tests
    log_every: int = 10


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename: a kill never leaves a torn checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def _autocast(amp: str, device_type: str):
    if amp == "none":
        return torch.autocast(device_type, enabled=False)
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"urda_fast: amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
    return torch.autocast(device_type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class CsvLog:
    """Appends rows to ``log.csv``; on resume, rows past the resumed iteration (written after the last checkpoint)
    are dropped so the log matches the weights."""

    def __init__(self, path: str, resume_from: int | None):
        self.path = path
        self.rows = []
        if resume_from is not None and os.path.isfile(path):
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= resume_from]

    def append(self, row: dict) -> None:
        self.rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def flush(self) -> None:
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)


def fit(task, optimizer, scheduler, settings: LoopSettings, *, device: torch.device, extra: dict | None = None) -> dict:
    """Train ``task`` for ``settings.iterations`` steps; returns {"best": metrics of best.pt, "last": last metrics}.

    ``extra`` is stored in every checkpoint (e.g. the model spec and config needed to rebuild the model)."""
    extra = extra or {}
    os.makedirs(settings.out_dir, exist_ok=True)
    last_path = os.path.join(settings.out_dir, "last.pt")
    best_path = os.path.join(settings.out_dir, "best.pt")
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == "fp16")
    start, best, last_metrics = 0, None, {}
    if settings.resume and os.path.isfile(last_path):
        state = torch.load(last_path, map_location="cpu", weights_only=False)
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"urda_fast: {last_path} was written by another checkpoint version")
        modules = task.modules()
        if set(state["modules"]) != set(modules):
            raise ValueError(f"urda_fast: {last_path} holds {sorted(state['modules'])}, this run has "
                             f"{sorted(modules)}: it is from another method")
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        for name, stream in task.streams().items():
            stream.load_state_dict(state["streams"][name])
        set_rng_state(state["rng"])
        start, best, last_metrics = state["iteration"], state["best"], state["metrics"]
    log = CsvLog(os.path.join(settings.out_dir, "log.csv"), start if settings.resume else None)

    def checkpoint(iteration):
        atomic_save({
            **extra, "version": CHECKPOINT_VERSION, "iteration": iteration, "best": best, "metrics": last_metrics,
            "modules": {name: m.state_dict() for name, m in task.modules().items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "streams": {name: s.state_dict() for name, s in task.streams().items()}, "rng": rng_state(),
        }, last_path)
        log.flush()

    save_every = settings.save_every or settings.eval_every
    end = settings.iterations if settings.stop_after is None else min(settings.iterations, settings.stop_after)
    bar = tqdm(range(start + 1, end + 1), initial=start, total=settings.iterations, disable=not settings.progress,
               desc=getattr(task, "name", "train"))
    tic = time.perf_counter()
    for iteration in bar:
        with nvtx_range(f"step {iteration}"):
            with _autocast(settings.amp, device.type):
                metrics = task.training_step()
            with nvtx_range("backward"):
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(metrics["loss"]).backward()
            with nvtx_range("optimizer"):
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
        if iteration % settings.log_every == 0 or iteration == settings.iterations:
            values = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in metrics.items()}
            log.append({"iteration": iteration, "lr": optimizer.param_groups[0]["lr"], **values})
            bar.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k.endswith("loss")})
        if iteration % settings.eval_every == 0 or iteration == settings.iterations:
            with nvtx_range("evaluate"):
                last_metrics = task.evaluate()
            log.append({"iteration": iteration, **{f"eval_{k}": v for k, v in last_metrics.items()}})
            score = last_metrics.get(settings.select_metric)
            if score is not None and (best is None or score > best[settings.select_metric]):
                best = dict(last_metrics, iteration=iteration)
                atomic_save({**extra, "version": CHECKPOINT_VERSION, "iteration": iteration, "metrics": last_metrics,
                             "modules": {name: m.state_dict() for name, m in task.modules().items()}}, best_path)
        if iteration % save_every == 0 or iteration == end:
            checkpoint(iteration)
    bar.close()
    return {"best": best, "last": last_metrics, "seconds": time.perf_counter() - tic}
