"""Run several batches through a model as one, with BatchNorm still normalising each batch by its own statistics.

DART's student sees a clean and an adversarial batch every step. One concatenated forward is faster (one launch per
layer, bigger GEMMs), but a training-mode BatchNorm would then mix the two batches' statistics and change the result.
Inside :func:`split_batchnorm`, every BatchNorm layer in training mode normalises each chunk by the chunk's own mean
and variance and updates its running statistics chunk by chunk, in order — exactly what separate forwards do — while
every other layer runs once on the whole batch.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _chunked_forward(module: nn.modules.batchnorm._BatchNorm, sizes):
    def forward(x):
        if not module.training:
            return type(module).forward(module, x)
        momentum = module.momentum
        outs = []
        for chunk in torch.split(x, sizes, dim=0):
            if module.track_running_stats:
                module.num_batches_tracked.add_(1)
            factor = (1.0 / float(module.num_batches_tracked)) if momentum is None else momentum
            outs.append(F.batch_norm(chunk, module.running_mean, module.running_var, module.weight, module.bias,
                                     True, factor, module.eps))
        return torch.cat(outs, dim=0)

    return forward


def has_batchnorm_in_training(model: nn.Module) -> bool:
    return any(isinstance(m, _BN_TYPES) and m.training for m in model.modules())


@contextlib.contextmanager
def split_batchnorm(model: nn.Module, sizes):
    """Within the block, training-mode BatchNorm layers of ``model`` treat dim 0 as ``sizes`` separate batches."""
    patched = [m for m in model.modules() if isinstance(m, _BN_TYPES)]
    for m in patched:
        m.forward = _chunked_forward(m, list(sizes))
    try:
        yield
    finally:
        for m in patched:
            del m.forward  # back to the class's forward
