"""NVTX ranges around the phases of every loop: off by default and free when off, switched on by ``--nvtx``.

    with nvtx_range("attack"): ...

Ranges go through torch.cuda.nvtx (which also works in CPU-only processes of a CUDA build) so Nsight Systems shows
them with ``nsys profile -t cuda,nvtx``, and through ``torch.profiler.record_function`` so the same phases appear in
a torch.profiler trace (``urda-fast profile``).
"""

from __future__ import annotations

import contextlib

_ENABLED = False
_OFF = contextlib.nullcontext()


def enable_nvtx(on: bool = True) -> None:
    global _ENABLED
    _ENABLED = bool(on)


def nvtx_enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def _range(name: str):
    import torch

    torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        torch.cuda.nvtx.range_pop()


def nvtx_range(name: str):
    """A context manager marking ``name`` on the timeline; a shared no-op when NVTX is off."""
    return _range(name) if _ENABLED else _OFF
