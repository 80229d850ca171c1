"""Correctly rounded float32 arithmetic for the Triton kernels, as torch's and the CPU kernels': on NVIDIA GPUs
float32's ``/`` and ``tl.sqrt`` compile to approximations (div.full, sqrt.approx: a few units off). float64 is
correctly rounded as it is."""

import triton
import triton.language as tl


@triton.jit
def div_rn(x, y):
    if x.dtype == tl.float32:
        return tl.math.div_rn(x, y)
    else:
        return x / y


@triton.jit
def sqrt_rn(x):
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)
