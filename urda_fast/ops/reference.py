"""The one pure-PyTorch definition of every urda_fast op.

Tests compare every backend against these functions, benchmarks time them as the eager baseline, and the
``reference`` backend runs them. They are written for clarity, not speed, and take the same arguments as the
public ops in :mod:`urda_fast.ops` (already validated there). ``upcast=True`` computes in float64 and casts back,
which is how the tests build their ground truth.
"""

from __future__ import annotations

import math

import torch

# Denominator floor for the L2 step direction and the projection; keeps a zero gradient / zero delta finite.
L2_NORM_FLOOR = 1e-12


def flat_per_sample(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, D); unlike reshape(B, -1) it also works for an empty batch."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def _per_sample(value, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A float or (B,)/0-d tensor as a (B, 1, ..., 1) tensor broadcastable against ``like``."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(-1)
    t = t.expand(batch) if t.numel() == 1 else t
    return t.reshape((batch,) + (1,) * (like.dim() - 1))


def _per_channel(value, like: torch.Tensor) -> torch.Tensor:
    """A float or per-channel tensor (C elements, any shape) as a tensor broadcastable on dim 1 of ``like``."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(-1)
    if t.numel() == 1 or like.dim() < 2:
        return t.reshape(())
    return t.reshape((1, -1) + (1,) * (like.dim() - 2))


def pgd_step(x_adv, grad, x_orig, *, step_size, eps, norm="linf", lower=0.0, upper=1.0, upcast=False):
    """One projected-gradient ascent step. See :func:`urda_fast.ops.pgd_step` for the semantics."""
    out_dtype = x_adv.dtype
    if upcast:
        x_adv, grad, x_orig = x_adv.double(), grad.double(), x_orig.double()
    batch = x_adv.shape[0]
    alpha = _per_sample(step_size, batch, x_adv)
    budget = _per_sample(eps, batch, x_adv)
    lo, hi = _per_channel(lower, x_adv), _per_channel(upper, x_adv)
    if norm == "linf":
        stepped = x_adv + alpha * torch.sign(grad)
        projected = torch.minimum(torch.maximum(stepped, x_orig - budget), x_orig + budget)
    elif norm == "l2":
        shape = (batch,) + (1,) * (x_adv.dim() - 1)
        grad_norm = flat_per_sample(grad).norm(dim=1).reshape(shape)
        stepped = x_adv + alpha * grad / grad_norm.clamp_min(L2_NORM_FLOOR)
        delta = stepped - x_orig
        delta_norm = flat_per_sample(delta).norm(dim=1).reshape(shape)
        factor = torch.clamp(budget / delta_norm.clamp_min(L2_NORM_FLOOR), max=1.0)
        projected = x_orig + delta * factor
        # A sample with a non-finite value (or sums overflowing) is all NaN: no finite point outside the budget.
        # in the kernels' accumulation dtype: float16 sums of squares pass 65504 for a gradient of unit entries
        acc = torch.float32 if x_adv.dtype in (torch.float16, torch.bfloat16) else x_adv.dtype
        sums = (flat_per_sample(grad).to(acc).square().sum(1) +
                flat_per_sample(x_adv - x_orig).to(acc).square().sum(1))
        projected = torch.where(torch.isfinite(sums).reshape(shape), projected, float("nan"))
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    return torch.minimum(torch.maximum(projected, lo), hi).to(out_dtype)


def kd_kl_rows(student_logits, teacher_logits, temperature=1.0):
    """Per-row KL(softmax(t/T) || softmax(s/T)) of (B, C) logits, as a (B,) tensor.

    Classes the teacher masks with -inf contribute 0 (0 * log 0 = 0); a class the teacher allows but the student
    masks gives +inf, as the mathematics says.
    """
    log_p = torch.log_softmax(teacher_logits / temperature, dim=-1)
    log_q = torch.log_softmax(student_logits / temperature, dim=-1)
    p = log_p.exp()
    # Mask the logs, not the product: where() of a NaN branch still sends NaN gradients through 0 * -inf. A NaN p (a
    # NaN or +inf logit in the row) is kept: the row and both its gradients are NaN.
    kept = ~(p <= 0)
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    return (p * (torch.where(kept, log_p, zero) - torch.where(kept, log_q, zero))).sum(dim=-1)


def kd_kl_loss(student_logits, teacher_logits, *, temperature=1.0, weight=None, reduction="batchmean",
               t2_scale=False, upcast=False):
    """Temperature-scaled distillation KL. See :func:`urda_fast.ops.kd_kl_loss` for the semantics."""
    # Mixed dtypes are promoted (as the fused backends do), then at least float32.
    loss_dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    if upcast:
        student_logits, teacher_logits = student_logits.double(), teacher_logits.double()
    else:
        student_logits, teacher_logits = student_logits.to(loss_dtype), teacher_logits.to(loss_dtype)
    rows = kd_kl_rows(student_logits, teacher_logits, temperature)
    return reduce_kd_rows(rows, weight, reduction, t2_scale, temperature).to(loss_dtype)


def reduce_kd_rows(rows, weight, reduction, t2_scale, temperature):
    """Per-sample weights, the optional T^2 factor and the reduction, applied to per-row KL values."""
    if weight is not None:
        rows = rows * weight.detach().to(rows.dtype)
    if t2_scale:
        rows = rows * (temperature * temperature)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.sum() / rows.shape[0]
    raise ValueError(f"reduction must be 'batchmean', 'sum' or 'none', got {reduction!r}")


def feature_mse_loss(a, b, *, upcast=False):
    """mean((a - b)^2) over all elements."""
    loss_dtype = torch.promote_types(a.dtype, torch.float32)
    work = torch.float64 if upcast else loss_dtype
    return ((a.to(work) - b.to(work)) ** 2).mean().to(loss_dtype)


def feature_cosine_rows(a, b, eps=1e-8):
    """Per-sample cosine similarity <a_i, b_i> / (max(|a_i|, eps) * max(|b_i|, eps)) of inputs flattened per sample."""
    a, b = flat_per_sample(a), flat_per_sample(b)
    norm_a = a.norm(dim=1).clamp_min(eps)
    norm_b = b.norm(dim=1).clamp_min(eps)
    return (a * b).sum(dim=1) / (norm_a * norm_b)


def feature_cosine_loss(a, b, *, eps=1e-8, upcast=False):
    """mean_i (1 - cos(a_i, b_i))."""
    loss_dtype = torch.promote_types(a.dtype, torch.float32)
    work = torch.float64 if upcast else loss_dtype
    return (1.0 - feature_cosine_rows(a.to(work), b.to(work), eps)).mean().to(loss_dtype)


def max_pool2d(x, kernel_size, stride, padding):
    """2-D max pooling, no dilation, floor mode: torch's definition (the first max of each window in row-major order
    takes the gradient; a NaN wins)."""
    return torch.nn.functional.max_pool2d(x, kernel_size, stride, padding)


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """2-D convolution, no dilation, one group: torch's definition (``ops.conv2d`` changes only how the input gradient
    is computed)."""
    return torch.nn.functional.conv2d(x, weight, bias, stride, padding)


def packed_self_attention(qkv, heads, mask=None, scale=None):
    """Multi-head self-attention of a packed projection ``qkv`` (B, T, 3E) = [q | k | v], E = heads * head_dim (head h
    at columns h * head_dim of each third, as ``nn.MultiheadAttention``): softmax(q k^T * scale + mask) v per head,
    heads side by side, (B, T, E). ``scale`` defaults to head_dim ** -0.5; ``mask`` is additive (T, T). A query whose
    keys are all masked gets probabilities 0 and output 0 (torch's safe softmax in ``scaled_dot_product_attention``)."""
    batch, tokens, packed = qkv.shape
    embed = packed // 3
    head_dim = embed // heads
    scale = head_dim ** -0.5 if scale is None else scale
    q, k, v = qkv.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    # Fully masked rows: a finite stand-in before the softmax (its NaN would reach the gradients), 0 after it.
    dead = torch.isneginf(scores).all(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return (probs @ v).transpose(1, 2).reshape(batch, tokens, embed)


def transformer_block(x, weights, heads, mask=None, ln_eps=1e-5, activation="gelu"):
    """A pre-LayerNorm transformer block, batch first (open_clip's ``ResidualAttentionBlock`` without layer scale):
    x1 = x + out_proj(attention(in_proj(ln_1(x)))), y = x1 + c_proj(act(c_fc(ln_2(x1)))); ``weights`` in the order of
    ``urda_fast.ops.transformer_block.BlockWeights``; activation ``gelu`` (erf), ``gelu_tanh`` or ``quick_gelu``."""
    (ln1_w, ln1_b, in_w, in_b, out_w, out_b, ln2_w, ln2_b, fc_w, fc_b, proj_w, proj_b) = weights
    embed = x.shape[-1]
    F = torch.nn.functional
    qkv = F.linear(F.layer_norm(x, (embed,), ln1_w, ln1_b, ln_eps), in_w, in_b)
    x1 = x + F.linear(packed_self_attention(qkv, heads, mask), out_w, out_b)
    h = F.linear(F.layer_norm(x1, (embed,), ln2_w, ln2_b, ln_eps), fc_w, fc_b)
    if activation == "quick_gelu":
        act = h * torch.sigmoid(1.702 * h)
    else:
        act = F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")
    return x1 + F.linear(act, proj_w, proj_b)


def batch_norm_eval(x, running_mean, running_var, weight=None, bias=None, eps=1e-5, *, relu=False):
    out = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps)
    return torch.relu(out) if relu else out
