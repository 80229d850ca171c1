"""Throughput of ``feature_mse_loss`` and ``feature_cosine_loss`` against eager and torch.compile of their
references; ``forward`` without grad, ``full`` = forward + backward to the student features ``a``."""

import pytest
import torch

import urda_fast.ops as ops
from urda_fast.ops import reference

pytestmark = pytest.mark.bench

SHAPES = {"small": [(256, 2048), (18, 256)], "large": [(256, 2048), (18, 256)]}
LOSSES = {"feature_mse": (reference.feature_mse_loss, ops.feature_mse_loss),
          "feature_cosine": (reference.feature_cosine_loss, ops.feature_cosine_loss)}


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_feature_loss(bench, loss, mode, shape, provider):
    full = mode == "full"
    a = torch.randn(shape, device=bench.device, dtype=bench.dtype).requires_grad_(full)
    b = torch.randn(shape, device=bench.device, dtype=bench.dtype)
    loss_fn = bench.provider_fn(provider, *LOSSES[loss])

    def fn():
        value = loss_fn(a, b)
        if full:
            torch.autograd.grad(value, a)

    # Compulsory traffic: read a and b; full also writes a's gradient.
    nbytes = a.numel() * a.element_size()
    bench.run(fn, op=loss, mode=mode, shape=shape, provider=provider, bytes_moved=(3 if full else 2) * nbytes,
              copy_numel=a.numel(), memory=full)
