"""``max_pool2d``: torch's 2-D max pooling (same values, same gradients, ties included) with a vectorised CPU kernel.

torch's CPU kernel for contiguous NCHW tensors is scalar, with index arithmetic per element: on the digits CNN's
64x32x16x16 maps its forward + backward takes ~3.6 ms on one core, about what the convolution before it takes; ours
~0.45 ms.
The op has two backends: ``cpu`` (csrc/cpu/max_pool.cpp) and ``reference`` (``F.max_pool2d``), which also runs
channels-last CPU tensors (torch's channels-last kernel is already vectorised) and every GPU tensor (cuDNN's pooling
is bandwidth-bound already).
"""

from __future__ import annotations

import torch

from . import _backends, _checks, reference


def max_pool2d(x, kernel_size, stride=None, padding=0, *, backend=None):
    """``F.max_pool2d(x, kernel_size, stride, padding)`` (no dilation, floor mode), differentiable w.r.t. ``x``.

    Args:
        x: (N, C, H, W) or (C, H, W) floating tensor.
        kernel_size, stride (default: kernel_size), padding: ints or pairs; padding at most half the kernel.
        backend: ``"cpu"`` or ``"reference"``; by default CPU tensors in NCHW layout take the CPU kernel and
            everything else torch's own pooling. The ``cuda``/``triton`` backends have no pooling kernel.
    """
    _checks.check_tensor(x, "x")
    if x.dim() not in (3, 4):
        raise ValueError(f"urda_fast: max_pool2d needs a (N, C, H, W) or (C, H, W) tensor, got shape {tuple(x.shape)}")
    kernel = _checks.int_pair(kernel_size, "max_pool2d", "kernel_size")
    stride = kernel if stride is None else _checks.int_pair(stride, "max_pool2d", "stride")
    padding = _checks.int_pair(padding, "max_pool2d", "padding")
    if min(kernel) < 1 or min(stride) < 1:
        raise ValueError(f"urda_fast: max_pool2d's kernel_size and stride must be >= 1, got {kernel} and {stride}")
    if min(padding) < 0 or any(2 * p > k for p, k in zip(padding, kernel)):
        raise ValueError(f"urda_fast: max_pool2d's padding must be between 0 and half the kernel, got {padding} "
                         f"for kernel {kernel}")
    if any(size + 2 * p < k for size, p, k in zip(x.shape[-2:], padding, kernel)):
        raise ValueError(f"urda_fast: max_pool2d's input {tuple(x.shape)} is smaller than its padded kernel {kernel}")
    fits_byte_index = kernel[0] * kernel[1] <= 255  # the CPU kernel saves the window index as one byte
    if not fits_byte_index and backend == "cpu":
        raise ValueError(f"urda_fast: max_pool2d's CPU kernel takes windows of at most 255 elements, got {kernel}; "
                         "use backend='reference'")
    if fits_byte_index and _use_cpu_kernel(backend, x):
        batched = x if x.dim() == 4 else x.unsqueeze(0)
        out, _ = torch.ops.urda_fast.max_pool2d_forward(batched.contiguous(), list(kernel), list(stride),
                                                         list(padding))
        return out if x.dim() == 4 else out.squeeze(0)
    return reference.max_pool2d(x, kernel, stride, padding)


def _use_cpu_kernel(backend, x) -> bool:
    choice = _backends.cpu_only_choice("max_pool2d", backend, "torch's own GPU pooling is already fast")
    if choice == "reference":
        return False
    if choice == "cpu":
        _backends.require_cpu_kernel("max_pool2d", x.device)
        return True
    if x.device.type != "cpu":
        return False
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return False  # torch's channels-last kernel is vectorised already
    return _backends.native_cpu_error() is None


def _fake_forward(x, kernel, stride, padding):
    height = (x.shape[2] + 2 * padding[0] - kernel[0]) // stride[0] + 1
    width = (x.shape[3] + 2 * padding[1] - kernel[1]) // stride[1] + 1
    out = x.new_empty((x.shape[0], x.shape[1], height, width))
    return out, out.new_empty(out.shape, dtype=torch.uint8)


def _fake_backward(grad_out, window_index, input_size, kernel, stride, padding):
    return grad_out.new_empty((grad_out.shape[0], grad_out.shape[1], input_size[0], input_size[1]))


def register() -> None:
    """Fake kernels of ``urda_fast::max_pool2d_*`` (CPU only: no Triton twin). The forward's autograd is registered in
    C++ (csrc/cpu/max_pool.cpp): a Python rule cost as much as the kernel on an attack's small maps."""
    torch.library.register_fake("urda_fast::max_pool2d_forward")(_fake_forward)
    torch.library.register_fake("urda_fast::max_pool2d_backward")(_fake_backward)
    _backends.forbid_double_backward("urda_fast::max_pool2d_backward", "max_pool2d")
