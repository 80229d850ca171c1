"""``conv2d``: ``F.conv2d`` whose input gradient, for 1-4 input channels on CPU, is urda_fast's kernel.

An image model's first layer is the one convolution whose input gradient attacks need at every step and training
never does, and oneDNN computes it (a transposed convolution with 1-4 output channels) slowly: ResNet's 7x7/2 stem
on 16x3x32x32 images took 2.0 ms per attack step, twice its forward; ours 0.9 ms (digits CNN's 1-channel 3x3 layer:
0.72 -> 0.18 ms; the stem at 224x224: 121 -> 50 ms). The forward, and the weight and bias gradients, are torch's.
"""

from __future__ import annotations

import torch

from . import _backends, _checks, reference

MAX_CHANNELS = 4


def conv2d(x, weight, bias=None, stride=1, padding=0, *, backend=None):
    """``F.conv2d(x, weight, bias, stride, padding)`` (no dilation, one group) with the fast input gradient.

    The kernel runs when the input is a float32/float64 NCHW CPU tensor that requires grad, with 1-4 channels and an
    int/pair padding; everything else (and ``backend="reference"``) is exactly ``F.conv2d``. ``backend="cpu"`` insists
    on the kernel and says why when it cannot run.
    """
    stride, padding = _checks.int_pair(stride, "conv2d", "stride"), (
        padding if isinstance(padding, str) else _checks.int_pair(padding, "conv2d", "padding"))
    reason = _kernel_unusable(x, weight, padding, backend)
    if reason is None:
        return torch.ops.urda_fast.conv2d_image_forward(x, weight, bias, list(stride), list(padding))
    if backend == "cpu":
        raise ValueError(f"urda_fast: conv2d's CPU kernel cannot run this call: {reason}; use backend='reference'")
    return reference.conv2d(x, weight, bias, stride, padding)


def _kernel_unusable(x, weight, padding, backend) -> str | None:
    if _backends.cpu_only_choice("conv2d", backend, "torch's GPU convolutions are fast") == "reference":
        return "the reference backend was asked for"
    if x.device.type != "cpu" or weight.device != x.device:
        return f"the input is on {x.device} and the weight on {weight.device} (CPU tensors only)"
    if x.dim() != 4 or weight.dim() != 4 or not 1 <= weight.shape[1] <= MAX_CHANNELS:
        return f"it takes (N, C, H, W) inputs with 1-{MAX_CHANNELS} channels, got {tuple(x.shape)}"
    if isinstance(padding, str):
        return f"padding={padding!r} (give ints)"
    if torch.is_autocast_enabled(x.device.type):
        return "autocast is on (torch's convolution runs in the autocast dtype)"
    if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        return f"dtypes {x.dtype} / {weight.dtype} (float32 or float64, one dtype)"
    if not x.is_contiguous():
        return "the input is not contiguous NCHW"
    if not (x.requires_grad and torch.is_grad_enabled()) and backend is None:
        return "no input gradient is needed"
    return _backends.native_cpu_error()


def _fake_forward(x, weight, bias, stride, padding):
    height = (x.shape[2] + 2 * padding[0] - weight.shape[2]) // stride[0] + 1
    width = (x.shape[3] + 2 * padding[1] - weight.shape[3]) // stride[1] + 1
    return x.new_empty((x.shape[0], weight.shape[0], height, width))


def _fake_input_grad(grad_out, weight, input_size, stride, padding):
    return grad_out.new_empty((grad_out.shape[0], weight.shape[1], *input_size))


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (stride, padding, None if bias is None else list(bias.shape))


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    stride, padding, bias_sizes = ctx.geometry
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():
        # create_graph=True (or tracing): torch's kernels, whose gradients are differentiable again.
        mask = [need_x, need_weight, need_bias]
        grad_x = None
    else:
        mask = [False, need_weight, need_bias]
        grad_x = (torch.ops.urda_fast.conv2d_input_grad(grad.contiguous(), weight, list(x.shape[2:]), stride,
                                                        padding) if need_x else None)
    if any(mask):
        torch_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad, x, weight, bias_sizes, stride, padding, [1, 1], False, [0, 0], 1, mask)
        grad_x = torch_x if mask[0] else grad_x
    else:
        grad_weight = grad_bias = None
    return (grad_x, grad_weight if need_weight else None, grad_bias if need_bias else None, None, None)


def register() -> None:
    """Fake kernels and autograd of ``urda_fast::conv2d_*`` (CPU only: no Triton twin)."""
    torch.library.register_fake("urda_fast::conv2d_image_forward")(_fake_forward)
    torch.library.register_fake("urda_fast::conv2d_input_grad")(_fake_input_grad)
    torch.library.register_autograd("urda_fast::conv2d_image_forward", _backward, setup_context=_setup_context)
    _backends.forbid_double_backward("urda_fast::conv2d_input_grad", "conv2d")
