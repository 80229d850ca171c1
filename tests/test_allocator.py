"""keep_freed_memory: on glibc it stops the page faults of buffers that a loop frees and allocates again (measured in a
fresh process, since the setting is process-wide), it can be switched off, and urda-fast reports it."""

import json
import os
import subprocess
import sys

import pytest

from urda_fast import allocator

# A BatchNorm forward + input gradient of a 2 MiB batch, in five windows of 10 steps: print the fewest minor page
# faults of a window. The heap may still grow a few times in the first windows (up to 8 fresh 2 MiB buffers seen over
# 50 steps, in a loaded CI run); the steady state is the claim.
FAULTS = """
import resource, sys, torch
from urda_fast.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.set_num_threads(1)
bn = torch.nn.BatchNorm2d(32).eval().requires_grad_(False)
x = torch.randn(64, 32, 16, 16, requires_grad=True)
grad = torch.randn(64, 32, 16, 16)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.autograd.grad(bn(x), x, grad)
windows = []
for _ in range(5):
    start = faults()
    for _ in range(10):
        torch.autograd.grad(bn(x), x, grad)
    windows.append(faults() - start)
print(applied, min(windows))
"""

glibc = pytest.mark.skipif(allocator._glibc() is None, reason="the C library is not glibc")


def run_faults(mode, script=FAULTS, **env):
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return (out[0] == "True", *map(int, out[1:]))


@glibc
def test_freed_buffers_stop_faulting():
    applied, kept = run_faults("keep")
    _, default = run_faults("default")
    assert applied
    # Kept: once the heap has settled, a window of 10 steps reuses the step's buffers (0-2 faults seen; one fresh
    # 2 MiB buffer is 512 pages).
    assert kept <= 512 + 100, kept
    # glibc's default maps the buffers afresh on this project's machines (~250-300 faults per step, ~2 500 a window);
    # other C libraries or versions may not, and then there is nothing to compare.
    if default > 10 * 100:
        assert kept < default / 4, (kept, default)


# A 40 MiB buffer allocated, written and freed 20 times (glibc maps buffers over 32 MiB afresh whatever the mmap
# threshold, unless mmap is off): print the page faults of the last 10, then the resident memory (MiB) that freeing
# a 256 MiB buffer below a live small one leaves behind.
BIG_FAULTS = """
import resource, sys, torch
from urda_fast.allocator import keep_freed_memory
applied = keep_freed_memory(large_buffers=sys.argv[1] == "large") if sys.argv[1] != "default" else False
for step in range(20):
    if step == 10:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(10 << 20).fill_(1.0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
before = rss()
big = torch.ones(64 << 20)
small = torch.ones(1000)
del big
print(applied, faults, rss() - before)
"""


@glibc
def test_buffers_above_the_largest_mmap_threshold_are_kept_only_when_asked():
    """large_buffers keeps them (no page faults) and so never hands a freed one back; the default hands it back."""
    large = run_faults("large", script=BIG_FAULTS)
    kept = run_faults("keep", script=BIG_FAULTS)
    default = run_faults("default", script=BIG_FAULTS)
    assert large[0] and kept[0] and not default[0]
    pages = (40 << 20) // 4096  # 10 240 per fresh buffer, at 4 KiB pages
    assert large[1] < pages, large
    if default[1] > 5 * pages:  # glibc's default maps them afresh (other C libraries may not)
        assert large[1] < default[1] / 10 and kept[1] > 5 * pages, (large, kept, default)
    assert kept[2] < 64 and default[2] < 64, (kept, default)  # the 256 MiB went back to the OS
    assert large[2] > 200, large  # ... and stayed resident with mmap off: the price, documented


@glibc
def test_the_environment_switches_it_off():
    applied, _ = run_faults("keep", URDA_FAST_KEEP_FREED_MEMORY="0")
    assert not applied


@glibc
def test_idempotent_and_reported_by_info():
    assert allocator.keep_freed_memory() and allocator.keep_freed_memory() and allocator.applied()
    out = subprocess.run([sys.executable, "-m", "urda_fast.cli", "info", "--json"], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out)["keep_freed_memory"] is True  # urda-fast applies it at start
    off = subprocess.run([sys.executable, "-m", "urda_fast.cli", "info", "--json"], capture_output=True, text=True,
                         check=True, env={**os.environ, "URDA_FAST_KEEP_FREED_MEMORY": "0"}).stdout
    assert json.loads(off)["keep_freed_memory"] is False
