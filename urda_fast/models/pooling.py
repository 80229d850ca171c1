"""``MaxPool2d``: ``nn.MaxPool2d`` on :func:`urda_fast.ops.max_pool2d` (same values and gradients, a vectorised CPU
kernel), and :func:`use_fast_pooling` to put it into any model."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn

from urda_fast import ops

from ._retype import retype


def fast_max_pool2d(x, kernel_size, stride, padding):
    return ops.max_pool2d(x, kernel_size, stride, padding)


# A leaf for torch.fx: tracing (the attacks' BatchNorm folding) records one call instead of entering the checks.
torch.fx.wrap("fast_max_pool2d")


class MaxPool2d(nn.MaxPool2d):
    """A drop-in ``nn.MaxPool2d`` (same arguments, no parameters). Dilation, ``ceil_mode`` and ``return_indices``
    are left to torch's kernel; everything else goes through :func:`urda_fast.ops.max_pool2d`."""

    def forward(self, x):
        integer = isinstance(x, torch.Tensor) and not x.is_floating_point()  # (x is a Proxy under torch.fx)
        if self.dilation not in (1, (1, 1)) or self.ceil_mode or self.return_indices or integer:
            return super().forward(x)  # integer tensors: torch pools them, the op takes floating point only
        return fast_max_pool2d(x, self.kernel_size, self.stride, self.padding)


def use_fast_pooling(model: nn.Module) -> nn.Module:
    """Turn every ``nn.MaxPool2d`` of ``model`` into :class:`MaxPool2d`, in place; returns the model."""
    return retype(model, nn.MaxPool2d, MaxPool2d)


def use_torch_pooling(model: nn.Module) -> nn.Module:
    """The inverse of :func:`use_fast_pooling` (benchmarks' plain-PyTorch twins)."""
    return retype(model, MaxPool2d, nn.MaxPool2d)
