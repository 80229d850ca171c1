"""Keep freed CPU memory in the process, so that a CPU training loop stops page-faulting its buffers back in.

glibc's malloc serves a request above its mmap threshold (128 KiB at first, raised on the fly) with a fresh ``mmap``
and unmaps it on free, and it returns the heap's free top to the OS past its trim threshold. A CPU training step
allocates and frees the same multi-MB activations and gradients every step, so every step faults those pages in
again, zero-filled by the kernel. On this project's 2-core VM, a BatchNorm forward + input gradient of a 64x32x16x16
batch (two 2 MiB buffers per step) took 0.57-0.66 ms by default (250-300 page faults per step) and 0.20-0.38 ms with
freed memory kept (0-8 faults). Whole workloads gain less, as glibc's own threshold adapts to many of their sizes:
PGD-10 on the digits CNN 93-108 vs 100-118 ms, an HPT step and PGD-10 on ResNet-18 within the noise (three
interleaved processes each). PyTorch's CPU performance guide recommends jemalloc or tcmalloc through ``LD_PRELOAD``
for the same reason; ``mallopt`` calls do it at run time, without a new dependency. The price: the process keeps
its peak heap (up to ``TRIM_THRESHOLD`` of free memory) instead of handing it back.

The mmap threshold cannot go past 32 MiB, so larger buffers (a 64x3x224x224 float32 batch is 37 MiB) are still
mapped afresh every time. ``keep_freed_memory(large_buffers=True)`` switches mmap off altogether, so they come from
the heap too: an out-of-place PGD step on that batch took 13.5 ms with glibc's defaults or the thresholds alone
(~9 400 faults per call), 5.2 ms with mmap off; the in-place step, which allocates nothing, 2.8-3.0 ms in each
process. Its price has no bound but the peak: a large buffer freed below a live small one is a hole in the heap that
glibc never hands back (three 1 GiB tensors freed left 3 GiB resident), so it is not the default; ``pytest bench/``
uses it, so that no provider's time holds page faults.

``urda-fast`` applies the default at start (``URDA_FAST_KEEP_FREED_MEMORY=0`` opts out), and so does ``pytest bench/``
(with large buffers) for every provider alike; library users call :func:`keep_freed_memory` once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV_VAR = "URDA_FAST_KEEP_FREED_MEMORY"
# mallopt parameters (malloc.h) and values: requests up to 32 MiB (glibc's own ceiling for the dynamic threshold on
# 64-bit) come from the heap, and up to 1 GiB of free heap top stays mapped; with large_buffers no request may be
# mmap-ed (M_MMAP_MAX 0), so larger ones come from the heap too.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30

_applied = False
_large_buffers = False


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # musl and others have no such symbol: their malloc is not glibc's
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(large_buffers: bool = False) -> bool:
    """Set glibc's mmap and trim thresholds (see the module's text) for this process, once; ``large_buffers`` also
    switches mmap off (buffers over 32 MiB kept too, at the price of memory never handed back). Returns True if they
    are set (now or before), False where the C library is not glibc (macOS, musl) or
    ``URDA_FAST_KEEP_FREED_MEMORY=0``."""
    global _applied, _large_buffers
    if os.environ.get(ENV_VAR, "1") == "0":
        return False
    libc = _glibc()
    if libc is None:
        return False
    if not _applied:
        _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                              TRIM_THRESHOLD))
    if _applied and large_buffers and not _large_buffers:
        _large_buffers = bool(libc.mallopt(M_MMAP_MAX, 0))
    return _applied and (_large_buffers or not large_buffers)


def applied() -> bool:
    """Whether :func:`keep_freed_memory` has set glibc's thresholds in this process."""
    return _applied
