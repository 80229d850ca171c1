"""NVTX ranges around the phases of every loop: off by default and free when off, switched on by ``--nvtx``.

    with nvtx_range("attack"): ...

Ranges go through torch.cuda.nvtx (which also works in CPU-only processes of a CUDA build) so Nsight Systems shows
them with ``nsys profile -t cuda,nvtx``, and through ``torch.profiler.record_function`` so the same phases appear in
a torch.profiler trace (``urda-fast profile``). A CPU-only torch build has no NVTX: there, the profiler's only.
"""

from __future__ import annotations

import contextlib
import functools

_ENABLED = False
_OFF = contextlib.nullcontext()


def enable_nvtx(on: bool = True) -> None:
    global _ENABLED
    _ENABLED = bool(on)


def nvtx_enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def nvtx_for(on: bool):
    """Ranges on (or off) for one run, then as they were: a library caller's later loops are not profiled unasked."""
    was = _ENABLED
    enable_nvtx(on)
    try:
        yield
    finally:
        enable_nvtx(was)


@functools.cache
def _nvtx_available() -> bool:
    """Whether torch.cuda.nvtx works in this build: a CPU-only torch wheel has stubs that raise. Ranges then go to
    torch.profiler only."""
    import torch

    try:
        torch.cuda.nvtx.range_push("urda_fast")
        torch.cuda.nvtx.range_pop()
    except (RuntimeError, AttributeError):
        return False
    return True


@contextlib.contextmanager
def _range(name: str):
    import torch

    nvtx = _nvtx_available()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


def nvtx_range(name: str):
    """A context manager marking ``name`` on the timeline; a shared no-op when NVTX is off."""
    return _range(name) if _ENABLED else _OFF
