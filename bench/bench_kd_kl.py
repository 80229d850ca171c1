"""Throughput and peak memory of ``kd_kl_loss`` (T=2, per-sample weight, batchmean) against eager and torch.compile
of ``reference.kd_kl_loss``; ``forward`` without grad, ``full`` = forward + backward to the student logits."""

import pytest
import torch

import urda_fast.ops as ops
from urda_fast.ops import reference

pytestmark = pytest.mark.bench

SHAPES = {"small": [(256, 1000), (4096, 1000), (256, 31)],
          "large": [(256, 1000), (4096, 1000), (256, 31), (8192, 32000)]}
TEMPERATURE = 2.0


@pytest.mark.parametrize("mode", ["forward", "full"])
def test_kd_kl(bench, mode, shape, provider):
    full = mode == "full"
    student = (3 * torch.randn(shape, device=bench.device, dtype=bench.dtype)).requires_grad_(full)
    teacher = 3 * torch.randn(shape, device=bench.device, dtype=bench.dtype)
    weight = torch.rand(shape[0], device=bench.device, dtype=bench.dtype)
    loss_fn = bench.provider_fn(provider, reference.kd_kl_loss, ops.kd_kl_loss)

    def fn():
        loss = loss_fn(student, teacher, temperature=TEMPERATURE, weight=weight, reduction="batchmean")
        if full:
            torch.autograd.grad(loss, student)

    # Compulsory traffic: read both logits; full also writes the student's gradient.
    nbytes = student.numel() * student.element_size()
    bench.run(fn, op="kd_kl", mode=mode, shape=shape, provider=provider, bytes_moved=(3 if full else 2) * nbytes,
              copy_numel=student.numel(), memory=full)
