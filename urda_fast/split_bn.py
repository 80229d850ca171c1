"""Run several batches through a model as one, with BatchNorm still normalising each batch by its own statistics.

DART's student sees a clean and an adversarial batch every step. One concatenated forward is faster (one launch per
layer, bigger GEMMs), but a training-mode BatchNorm would then mix the two batches' statistics and change the result.
Inside :func:`split_batchnorm`, every BatchNorm layer in training mode normalises each chunk by the chunk's own mean
and variance and updates its running statistics chunk by chunk, in order — exactly what separate forwards do — while
every other layer runs once on the whole batch.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn

_BatchNorm = nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d, SyncBatchNorm, the lazy ones, subclasses


def _chunked_forward(forward, module: nn.Module, sizes):
    """``forward`` (the module's own: its class's, or one set on the instance) on each chunk in turn, in training
    mode: literally separate forwards, so running statistics, ``momentum=None``'s cumulative average,
    ``track_running_stats`` and a subclass's own computation all behave as they would."""
    def chunked(x):
        if not module.training:
            return forward(x)
        return torch.cat([forward(chunk) for chunk in torch.split(x, sizes, dim=0)], dim=0)

    return chunked


def has_batchnorm_in_training(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) and m.training for m in model.modules())


@contextlib.contextmanager
def split_batchnorm(model: nn.Module, sizes):
    """Within the block, training-mode BatchNorm layers of ``model`` treat dim 0 as ``sizes`` separate batches."""
    patched = [(m, m.__dict__.get("forward")) for m in model.modules() if isinstance(m, _BatchNorm)]
    for m, own in patched:
        m.forward = _chunked_forward(own or functools.partial(type(m).forward, m), m, list(sizes))
    try:
        yield
    finally:
        for m, own in patched:
            if own is None:
                del m.forward  # back to the class's forward
            else:
                m.forward = own
