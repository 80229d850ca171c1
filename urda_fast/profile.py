"""`urda-fast profile dart|hpt`: a short training loop under torch.profiler, written as a Chrome/Perfetto trace and a
top-ops table, so a slow step can be found in minutes (on CPU or GPU).

The loop's NVTX phases (DART: teacher, attack, student; HPT: text, attack, target / proxy / anchor forward; both:
backward, optimizer...) are switched on, so they appear in the trace as ``record_function`` ranges and are summed per
phase in ``phases.json``.
"""

from __future__ import annotations

import itertools
import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from urda_fast.files import check_out_folder
from urda_fast.profiling import nvtx_for, nvtx_range

PHASES = ("data", "teacher", "proxy", "anchor", "attack", "student", "target", "text", "target forward",
          "proxy forward", "anchor forward", "uda step", "loss", "backward", "optimizer", "evaluate")


def check_profile_args(steps: int, warmup: int, batch_size: int, image_size: int, attack_steps: int,
                       out_dir: str) -> None:
    """The CLI's numbers and output folder, before any model is built (a ViT-B takes a minute to)."""
    for name, value, least in (("steps", steps, 1), ("warmup", warmup, 0), ("batch_size", batch_size, 1),
                               ("image_size", image_size, 0), ("attack_steps", attack_steps, 1)):
        if value < least:
            raise ValueError(f"profile: {name} must be >= {least}, got {value}")
    check_out_folder(out_dir, "profile")


def profile_steps(step, steps: int, out_dir: str, device: torch.device, warmup: int = 2, row_limit: int = 25) -> dict:
    """Run ``step()`` ``warmup`` times, then ``steps`` times under the profiler; write ``trace.json`` (open it in
    chrome://tracing or ui.perfetto.dev), ``top_ops.txt`` and ``phases.json`` under ``out_dir``."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"profile: steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    os.makedirs(out_dir, exist_ok=True)
    with nvtx_for(True):
        for _ in range(warmup):  # first calls pay for allocation, lazy init and compilation: keep them out
            step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        start = time.perf_counter()
        with profile(activities=activities, record_shapes=True) as prof:
            for i in range(steps):
                with record_function(f"step {i}"):
                    step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    trace = os.path.join(out_dir, "trace.json")
    prof.export_chrome_trace(trace)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
    with open(os.path.join(out_dir, "top_ops.txt"), "w") as f:
        f.write(table + "\n")
    phases = {}
    for event in prof.key_averages():
        if event.key in PHASES:
            phases[event.key] = {"calls": event.count, "cpu_ms": event.cpu_time_total / 1e3}
    summary = {"steps": steps, "seconds": seconds, "ms_per_step": 1e3 * seconds / steps, "device": str(device),
               "phases": phases, "trace": trace}
    with open(os.path.join(out_dir, "phases.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return {**summary, "table": table}


def dart_step_fn(*, backbone: str = "digits_cnn", batch_size: int = 64, image_size: int = 0, teacher: str = "",
                 device: str = "auto", attack_steps: int = 10, seed: int = 0):
    """One DART robustify step (teacher, attack, student, loss, backward, optimizer) on a fixed random target batch;
    the teacher is ``teacher`` (a `dart pretrain` checkpoint) or a randomly initialised ``backbone``.
    Returns ``(step, device)``."""
    from urda_fast.dart.common import load_teacher, sgd
    from urda_fast.dart.config import RobustifyConfig
    from urda_fast.dart.robustify import DartTask, build_student
    from urda_fast.distributed import pick_device
    from urda_fast.models import ModelSpec

    if batch_size < 1:
        raise ValueError(f"profile: batch_size must be >= 1, got {batch_size}")
    torch.manual_seed(seed)
    if teacher:
        model, spec, dev = load_teacher(teacher, device)
    else:
        channels = 1 if backbone == "digits_cnn" else 3
        spec = ModelSpec(backbone=backbone, num_classes=10, bottleneck_dim=256, mean=(0.5,) * channels,
                         std=(0.5,) * channels)
        dev = pick_device(device)
        model = spec.build().to(dev).eval()
    channels = len(spec.mean)
    size = image_size or (16 if spec.backbone == "digits_cnn" else 224)
    cfg = RobustifyConfig(attack_steps=attack_steps)
    student = build_student(cfg, model, spec)
    batch = (torch.rand(batch_size, channels, size, size, device=dev),)
    task = DartTask(cfg, model, student, itertools.repeat(batch), None)
    optimizer = sgd(student.param_groups(cfg.lr), cfg)

    def step():
        loss = task.training_step()["loss"]
        with nvtx_range("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with nvtx_range("optimizer"):
            optimizer.step()

    return step, dev


def hpt_step_fn(*, target_arch: str = "urda-tiny-vit", proxy_arch: str = "urda-tiny-rn", batch_size: int = 64,
                image_size: int = 0, attack_steps: int = 5, device: str = "auto", target: str = "", proxy: str = "",
                num_classes: int = 10, trainable: str = "all", seed: int = 0, compile: bool = False):
    """One HPT step in GPD's HPT phase (text, attack, target / proxy / anchor forward, loss, backward, optimizer) on a
    fixed random batch of ``num_classes`` classes. The target and proxy are ``target`` / ``proxy``
    (``"ARCH:CHECKPOINT"``, real weights) or randomly initialised ``target_arch`` / ``proxy_arch``; the anchor is a
    copy of the target. ``compile``: the image towers through ``torch.compile``, as ``hpt train --compile``.
    ``image_size`` 0 = the target's input size. Returns ``(step, device)``."""
    from urda_fast.hpt.step_builder import build_hpt_step, load_step_models, step_config

    models = load_step_models(target_arch, proxy_arch, target=target, proxy=proxy, device=device, seed=seed)
    # Random start as in a real run: the profile should show the step train() takes.
    cfg = step_config(attack_steps=attack_steps, trainable=trainable, attack_random_start=True, compile=compile)
    built = build_hpt_step(models, cfg, batch_size=batch_size, image_size=image_size, num_classes=num_classes,
                           seed=seed)

    return built.step, models.device
