"""``FastSequential``: ``nn.Sequential`` that runs each eval-mode BatchNorm -> ReLU pair as one op on CPU.

An attack runs the model in eval mode, where such a pair is ``relu(x * scale + shift)`` per channel, and
differentiates it at every step: torch's BatchNorm and ReLU take two passes forward and three backward (its BatchNorm
backward reduces the gradient and the input for weight and bias gradients an attack does not need), ours
(:func:`urda_fast.ops.batch_norm_eval`) one each way, with torch's values and gradients. PGD-10 on the digits CNN
(64x1x16x16), paired against the textbook eager loop: 1.17-1.18x -> 1.36-1.47x. Below ``MIN_NUMEL`` elements, on
other devices, in training mode, with hooks on either module and under ``torch.fx`` tracing, the pair runs as the two
modules it is.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules import module as _module

from urda_fast import ops

# Smaller inputs run torch's modules: the fused op's Python path costs ~50 us a call more than theirs, more than the
# passes it saves below ~128K elements (forward + input gradient, warm caches: 16x64x8x8 0.85x, 32x64x8x8 1.05x,
# 64x32x16x16 2.0x torch's).
MIN_NUMEL = 1 << 17


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks)


def _fusable(norm: nn.Module, relu: nn.Module, x) -> bool:
    # x first: under torch.fx tracing it is a Proxy, whose attributes must not be read here.
    return (isinstance(x, torch.Tensor) and isinstance(norm, nn.modules.batchnorm._BatchNorm)
            and isinstance(relu, nn.ReLU) and not norm.training and norm.running_mean is not None
            and x.device.type == "cpu" and x.numel() >= MIN_NUMEL
            and not (_hooked(norm) or _hooked(relu) or _global_hooks()))


class FastSequential(nn.Sequential):
    """A drop-in ``nn.Sequential`` (same modules, same state dict) whose eval-mode BatchNorm -> ReLU pairs on large
    CPU inputs run as one op; see the module's text."""

    def forward(self, x):
        modules = list(self._modules.values())
        i = 0
        while i < len(modules):
            norm = modules[i]
            if i + 1 < len(modules) and _fusable(norm, modules[i + 1], x):
                norm._check_input_dim(x)
                x = ops.batch_norm_eval(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps,
                                        relu=True)
                i += 2
            else:
                x = norm(x)
                i += 1
        return x


def _has_pair(sequential: nn.Sequential) -> bool:
    modules = list(sequential)
    return any(isinstance(a, nn.modules.batchnorm._BatchNorm) and isinstance(b, nn.ReLU)
               for a, b in zip(modules, modules[1:]))


def use_fast_batch_norm(model: nn.Module) -> nn.Module:
    """Turn every ``nn.Sequential`` of ``model`` that holds a BatchNorm -> ReLU pair into :class:`FastSequential`, in
    place (the class changes, the modules stay); returns the model."""
    for module in model.modules():
        if type(module) is nn.Sequential and _has_pair(module):
            module.__class__ = FastSequential
    return model


def use_torch_batch_norm(model: nn.Module) -> nn.Module:
    """The inverse of :func:`use_fast_batch_norm` (benchmarks' plain-PyTorch twins)."""
    for module in model.modules():
        if type(module) is FastSequential:
            module.__class__ = nn.Sequential
    return model
