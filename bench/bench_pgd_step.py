"""Throughput of one PGD step (L-inf and L2): ``pgd_step`` / in-place ``pgd_step_`` against eager and
torch.compile of ``reference.pgd_step``. The step has no backward, so the only mode is ``forward``."""

import pytest
import torch

import urda_fast.ops as ops
from urda_fast.ops import reference

pytestmark = pytest.mark.bench

# 64x3x224x224 stands in for the issue's 128x3x224x224 on CPU (the issue's own CPU numbers are for this size).
SHAPES = {"small": [(64, 3, 224, 224), (512, 3, 32, 32)], "large": [(128, 3, 224, 224), (512, 3, 32, 32)]}
INPLACE = True  # providers also get <backend>_inplace, timing pgd_step_
STEP = {"linf": {"step_size": 2 / 255, "eps": 8 / 255}, "l2": {"step_size": 0.1, "eps": 0.5}}


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_step(bench, norm, shape, provider):
    x_orig = torch.rand(shape, device=bench.device, dtype=bench.dtype)
    delta = torch.empty_like(x_orig).uniform_(-STEP["linf"]["eps"], STEP["linf"]["eps"])
    x_start = (x_orig + delta).clamp_(0, 1)
    x_adv, grad = x_start.clone(), torch.randn_like(x_orig)
    step = bench.provider_fn(provider, reference.pgd_step, ops.pgd_step, ops.pgd_step_)

    def fn():
        return step(x_adv, grad, x_orig, norm=norm, **STEP[norm])

    # Every round steps from the same x_adv (pgd_step_ overwrites it), for every provider alike.
    nbytes = x_orig.numel() * x_orig.element_size()
    bench.run(fn, op="pgd_step", variant=norm, mode="forward", shape=shape, provider=provider,
              bytes_moved=4 * nbytes, copy_numel=x_orig.numel(), setup=lambda: x_adv.copy_(x_start))
