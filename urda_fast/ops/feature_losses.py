"""``feature_mse_loss`` and ``feature_cosine_loss``: feature-distillation losses with fused forward and backward."""

from __future__ import annotations

import torch

from . import _backends, _checks, reference

COSINE_EPS = 1e-8


def _flat_pair(a, b):
    _checks.check_tensor(a, "a")
    _checks.check_same(a, "a", b, "b", dtype=False)
    if a.dim() == 0:
        raise ValueError("urda_fast: features must have a batch dimension (dim 0), got 0-d tensors")
    dtype = torch.promote_types(a.dtype, b.dtype)
    return (reference.flat_per_sample(a.to(dtype)).contiguous(), reference.flat_per_sample(b.to(dtype)).contiguous())


def feature_mse_loss(a, b, *, backend=None):
    r"""Feature MSE :math:`\mathrm{mean}((a-b)^2)` over all elements, differentiable w.r.t. both inputs.

    Args:
        a, b: (B, ...) floating tensors of one shape and device (N-D inputs are flattened per sample).
        backend: see :func:`urda_fast.ops.available_backends`.

    Returns:
        A 0-d loss, float32 for half/float32 inputs, float64 for float64. NaN for empty inputs, as ``torch.mean``.
    """
    flat_a, flat_b = _flat_pair(a, b)
    name = _backends.resolve_backend(backend, flat_a.device)
    if name == "reference":
        return reference.feature_mse_loss(flat_a, flat_b)
    return _backends.op_for(name, "feature_losses", "feature_mse_forward", register)(flat_a, flat_b)


def feature_cosine_loss(a, b, *, eps=COSINE_EPS, backend=None):
    r"""Per-sample cosine distance :math:`\mathrm{mean}_i (1 - \cos(a_i, b_i))`, norms clamped below by ``eps``.

    :math:`\cos(a_i, b_i) = \langle a_i, b_i\rangle / (\max(\lVert a_i\rVert, \epsilon)\max(\lVert b_i\rVert, \epsilon))`.

    Args:
        a, b: (B, ...) floating tensors of one shape and device (N-D inputs are flattened per sample).
        eps: norm floor, > 0.
        backend: see :func:`urda_fast.ops.available_backends`.

    Returns:
        A 0-d loss, float32 for half/float32 inputs, float64 for float64.
    """
    flat_a, flat_b = _flat_pair(a, b)
    _checks.check_positive_finite(eps, "eps")
    name = _backends.resolve_backend(backend, flat_a.device)
    if name == "reference":
        return reference.feature_cosine_loss(flat_a, flat_b, eps=eps)
    return _backends.op_for(name, "feature_losses", "feature_cosine_forward", register)(flat_a, flat_b, float(eps))[0]


def _acc_dtype(t):
    return torch.promote_types(t.dtype, torch.float32)


def _fake_feature_mse_forward(a, b):
    torch._check(a.dim() == 2 and b.shape == a.shape, lambda: "a and b must be 2-D of one shape")
    return a.new_empty((), dtype=_acc_dtype(a))


def _fake_feature_mse_backward(grad, a, b):
    return torch.empty_like(a)


def _fake_feature_cosine_forward(a, b, eps):
    torch._check(a.dim() == 2 and b.shape == a.shape, lambda: "a and b must be 2-D of one shape")
    return a.new_empty((), dtype=_acc_dtype(a)), a.new_empty((a.shape[0], 3), dtype=_acc_dtype(a))


def _fake_feature_cosine_backward(grad, a, b, stats, eps, grad_a, grad_b):
    return (torch.empty_like(a) if grad_a else a.new_empty((0,)), torch.empty_like(b) if grad_b else b.new_empty((0,)))


def _setup_context_feature_mse(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _setup_context_feature_cosine(ctx, inputs, output):
    a, b, eps = inputs
    ctx.save_for_backward(a, b, output[1])
    ctx.eps = eps


def register(suffix: str, *, fake: bool) -> None:
    """Fake kernels (native ops) and autograd for ``urda_fast::feature_*{suffix}``; backward calls the same backend."""
    mse, cos = f"urda_fast::feature_mse_forward{suffix}", f"urda_fast::feature_cosine_forward{suffix}"
    mse_backward = getattr(torch.ops.urda_fast, f"feature_mse_backward{suffix}")
    cos_backward = getattr(torch.ops.urda_fast, f"feature_cosine_backward{suffix}")
    if fake:
        torch.library.register_fake(mse)(_fake_feature_mse_forward)
        torch.library.register_fake(f"urda_fast::feature_mse_backward{suffix}")(_fake_feature_mse_backward)
        torch.library.register_fake(cos)(_fake_feature_cosine_forward)
        torch.library.register_fake(f"urda_fast::feature_cosine_backward{suffix}")(_fake_feature_cosine_backward)

    def backward_mse(ctx, grad):
        a, b = ctx.saved_tensors
        if not any(ctx.needs_input_grad[:2]):
            return None, None
        d_a = mse_backward(grad.contiguous(), a, b)
        return (d_a if ctx.needs_input_grad[0] else None), (-d_a if ctx.needs_input_grad[1] else None)

    def backward_cosine(ctx, grad, _grad_stats):
        a, b, stats = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[:2]
        if not (need_a or need_b):
            return None, None, None
        d_a, d_b = cos_backward(grad.contiguous(), a, b, stats, ctx.eps, need_a, need_b)
        return (d_a if need_a else None), (d_b if need_b else None), None

    torch.library.register_autograd(mse, backward_mse, setup_context=_setup_context_feature_mse)
    torch.library.register_autograd(cos, backward_cosine, setup_context=_setup_context_feature_cosine)
    _backends.forbid_double_backward(f"urda_fast::feature_mse_backward{suffix}", "feature_mse_loss")
    _backends.forbid_double_backward(f"urda_fast::feature_cosine_backward{suffix}", "feature_cosine_loss")
