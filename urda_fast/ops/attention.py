"""``packed_self_attention``: multi-head self-attention from the packed input projection, with a CPU kernel for short
sequences.

``nn.MultiheadAttention`` projects q, k and v with one matmul into (B, T, 3E), then splits the heads out (copies),
runs two batched matmuls of (T, head_dim) matrices per head around a masked softmax, and merges the heads back; for
the 17 tokens of a small ViT that bookkeeping costs more than the matmuls, forward and backward. The CPU kernel
(csrc/cpu/attention.cpp) reads each head's rows in place from the packed projection and writes the merged output,
and its backward the packed gradient, in one pass each (the tiny CLIP's 64x17x(3x64), 4 heads, forward + backward:
0.35 ms vs 0.92 ms for torch's math kernel and 1.8 ms for its default, flash). It keeps the (B, heads, T, T)
probabilities for the backward, as the math kernel does: ``FastMultiheadAttention`` uses it up to 200 tokens, where
it is still faster (``urda_fast/models/attention.py`` has the measurements). Backends: ``cpu`` and ``reference``
(plain matmuls; every GPU tensor).
"""

from __future__ import annotations

import torch

from . import _backends, _checks, reference


def packed_self_attention(qkv, heads, *, mask=None, scale=None, backend=None):
    """softmax(q k^T * scale + mask) v for each head of a packed projection, heads side by side.

    Args:
        qkv: (B, T, 3E) floating tensor, [q | k | v] along the last dimension, E = heads * head_dim, head h at columns
            h * head_dim of each third (``F.linear(x, mha.in_proj_weight, mha.in_proj_bias)``).
        heads: number of heads (divides E).
        mask: None or an additive (T, T) float tensor of qkv's dtype and device (0 where a query attends a key, -inf
            where not). A constant: it gets no gradient. A query whose keys are all masked gets output 0.
        scale: the scores' factor, default head_dim ** -0.5.
        backend: ``"cpu"`` or ``"reference"``; by default float32/float64 CPU tensors take the kernel, everything else
            the reference (plain matmuls).

    Returns:
        (B, T, E), differentiable w.r.t. ``qkv`` (once: the kernel's backward has no second derivative).
    """
    _checks.check_tensor(qkv, "qkv")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"urda_fast: packed_self_attention's heads must be a positive int, got {heads!r}")
    if qkv.dim() != 3 or qkv.shape[2] == 0 or qkv.shape[2] % (3 * heads) != 0:
        raise ValueError(f"urda_fast: packed_self_attention needs qkv of shape (B, T, 3 * heads * head_dim), got "
                         f"{tuple(qkv.shape)} with heads={heads}")
    head_dim = qkv.shape[2] // (3 * heads)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    if not _checks.is_finite(scale):
        raise ValueError(f"urda_fast: packed_self_attention's scale must be finite, got {scale}")
    if mask is not None:
        _check_mask(mask, qkv)
    if _backends.float_cpu_kernel("packed_self_attention", backend, qkv, "torch's GPU attention kernels are fast"):
        out, _ = torch.ops.urda_fast.packed_attention_forward(qkv.contiguous(), mask if mask is None else
                                                              mask.contiguous(), heads, scale)
        return out
    return reference.packed_self_attention(qkv, heads, mask, scale)


def _check_mask(mask, qkv, op="packed_self_attention") -> None:
    """``mask`` fits ``qkv`` (B, T, ...): an additive (T, T) constant of its dtype and device."""
    tokens = qkv.shape[1]
    if not isinstance(mask, torch.Tensor) or mask.dtype != qkv.dtype:
        raise TypeError(f"urda_fast: {op}'s mask must be an additive float mask of the input's dtype "
                        f"({qkv.dtype}; 0 where attended, -inf where masked), got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.shape != (tokens, tokens) or mask.device != qkv.device:
        raise ValueError(f"urda_fast: {op}'s mask must be ({tokens}, {tokens}) on {qkv.device}, got "
                         f"{tuple(mask.shape)} on {mask.device}")
    if mask.requires_grad:
        raise ValueError(f"urda_fast: {op}'s mask requires grad, but it is a constant here (no "
                         "gradient flows to it); pass mask.detach(), or compute a learned bias with plain matmuls")


def _fake_forward(qkv, mask, heads, scale):
    batch, tokens, packed = qkv.shape
    return qkv.new_empty((batch, tokens, packed // 3)), qkv.new_empty((batch, heads, tokens, tokens))


def _fake_backward(grad_out, qkv, probs, heads, scale):
    return torch.empty_like(qkv)


def _setup_context(ctx, inputs, output):
    qkv, _mask, heads, scale = inputs
    ctx.save_for_backward(qkv, output[1])  # the probabilities: the backward needs no softmax again
    ctx.attention = (heads, scale)
    # The probabilities are the backward's, not a differentiable output; and an unused output gets no zero-filled
    # gradient (a (B, heads, T, T) fill at every backward before).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, _grad_probs):
    qkv, probs = ctx.saved_tensors
    if grad is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    grad_qkv = torch.ops.urda_fast.packed_attention_backward(grad.contiguous(), qkv, probs, *ctx.attention)
    return grad_qkv, None, None, None


def register() -> None:
    """Fake kernels and autograd of ``urda_fast::packed_attention_*`` (CPU only: no Triton twin)."""
    torch.library.register_fake("urda_fast::packed_attention_forward")(_fake_forward)
    torch.library.register_fake("urda_fast::packed_attention_backward")(_fake_backward)
    torch.library.register_autograd("urda_fast::packed_attention_forward", _backward, setup_context=_setup_context)
    _backends.forbid_double_backward("urda_fast::packed_attention_backward", "packed_self_attention")
