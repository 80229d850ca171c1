"""``batch_norm_eval``: eval-mode BatchNorm, optionally followed by ReLU, in one pass each way on CPU.

An attack runs the model in eval mode and differentiates it at every step. torch's CPU BatchNorm backward reduces the
gradient and the input per channel (for weight and bias gradients nobody asked for) before it scales the gradient:
two passes over both, and a ReLU after it adds a pass each way. Here the forward writes relu(x * scale + shift) and
the backward reads the gradient and the output once (csrc/cpu/batch_norm.cpp). The per-channel constants are
computed with torch's own operations in the order torch's kernels use them, so values and gradients are torch's,
bit for bit (tests); they are kept while the statistics and parameters stay unchanged, since an attack passes the
same ones at every step.
"""

from __future__ import annotations

import torch

from . import _backends, reference
from ._memo import VersionedMemo


def batch_norm_eval(x, running_mean, running_var, weight=None, bias=None, eps=1e-5, *, relu=False, backend=None):
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps)``, then ``F.relu`` when
    ``relu``; differentiable w.r.t. ``x`` (the statistics, weight and bias are constants here).

    The CPU kernel runs float32/float64 contiguous (N, C, *) or channels-last CPU tensors when no gradient w.r.t.
    ``weight`` or ``bias`` is needed; everything else (and ``backend="reference"``) is torch's BatchNorm and ReLU.
    ``backend="cpu"`` insists on the kernel and says why when it cannot run.
    """
    reason = _kernel_unusable(x, running_mean, running_var, weight, bias, backend)
    if reason is None:
        scale, shift, grad_factors = _constants(running_mean, running_var, weight, bias, float(eps))
        return torch.ops.urda_fast.batch_norm_eval_forward(x, scale, shift, grad_factors, relu)
    if backend == "cpu":
        raise ValueError(f"urda_fast: batch_norm_eval's CPU kernel cannot run this call: {reason}; "
                         "use backend='reference'")
    return reference.batch_norm_eval(x, running_mean, running_var, weight, bias, eps, relu=relu)


def _kernel_unusable(x, running_mean, running_var, weight, bias, backend) -> str | None:
    choice = _backends.cpu_only_choice("batch_norm_eval", backend, "torch's GPU BatchNorm is one pass already")
    if choice == "reference":
        return "the reference backend was asked for"
    if x.device.type != "cpu":
        return f"the input is on {x.device} (CPU tensors only)"
    if x.dtype not in (torch.float32, torch.float64):
        return f"dtype {x.dtype} (float32 or float64)"
    if x.dim() < 2:
        return f"it takes (N, C, *) inputs, got shape {tuple(x.shape)}"
    if not (x.is_contiguous() or _channels_last(x)):
        return f"the input is neither contiguous nor channels-last (shape {tuple(x.shape)}, strides {x.stride()})"
    channels = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is None and name.startswith("running"):
            return f"{name} is None (batch statistics: training mode)"
        if t is not None and (t.device != x.device or t.dtype != x.dtype or t.shape != (channels,)):
            return f"{name} is not a ({channels},) {x.dtype} tensor on {x.device}"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, bias)):
        return "weight or bias requires grad (the kernel gives the input gradient only)"
    return _backends.native_cpu_error()


def _channels_last(x) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


_CONSTANTS = VersionedMemo()


def _constants(running_mean, running_var, weight, bias, eps):
    """(scale, shift, grad_factors), kept while the four tensors live unchanged (outside tracing)."""
    tensors = tuple(t for t in (running_mean, running_var, weight, bias) if t is not None)
    tag = (eps, weight is None, bias is None)
    cacheable = not torch.compiler.is_compiling() and not any(t.is_inference() for t in tensors)
    if cacheable:
        hit = _CONSTANTS.get(tensors)
        if hit is not None and hit[0] == tag:
            return hit[1]
    # Normal tensors even inside inference_mode: the forward saves grad_factors for a later backward.
    with torch.no_grad(), torch.inference_mode(False):
        constants = torch_batch_norm_constants(running_mean, running_var, weight, bias, eps)
    if cacheable:
        _CONSTANTS.put(tensors, (tag, constants))
    return constants


def torch_batch_norm_constants(running_mean, running_var, weight, bias, eps):
    """torch's eval BatchNorm as ``out = fma(x, scale, shift)`` and ``grad_in = (grad * k0) * k1`` per channel,
    computed as torch's CPU kernels do (batch_norm_kernel.cpp): the forward's inverse standard deviation is
    ``rsqrt(var + eps)`` in the input's dtype, ``shift = bias - mean * scale`` fused (``addcmul``); the backward's is
    ``1 / sqrt(var + eps)`` in float64, rounded to the input's dtype, then times the weight."""
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = torch.addcmul(bias, running_mean, scale, value=-1) if bias is not None else -(running_mean * scale)
    inv_std = (1 / torch.sqrt(running_var.double() + eps)).to(running_var.dtype)
    grad_factors = torch.stack([inv_std, weight if weight is not None else torch.ones_like(inv_std)])
    return scale, shift, grad_factors


def _fake_forward(x, scale, shift, grad_factors, relu):
    return torch.empty_like(x)


def _fake_backward(grad_out, out, grad_factors, relu):
    return torch.empty_like(grad_out)


def register() -> None:
    """Fake kernels of ``urda_fast::batch_norm_eval_*`` (CPU only: no Triton twin). The forward's autograd is
    registered in C++ (csrc/cpu/batch_norm.cpp): a Python rule cost more than the kernel on an attack's activations."""
    torch.library.register_fake("urda_fast::batch_norm_eval_forward")(_fake_forward)
    torch.library.register_fake("urda_fast::batch_norm_eval_backward")(_fake_backward)
    _backends.forbid_double_backward("urda_fast::batch_norm_eval_backward", "batch_norm_eval")
