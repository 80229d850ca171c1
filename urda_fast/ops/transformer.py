"""``transformer_block``: one pre-LayerNorm transformer block (open_clip's ``ResidualAttentionBlock``, the blocks of
CLIP's image and text towers) as one op, with a CPU kernel for short sequences.

    x1 = x + out_proj(attention(in_proj(ln_1(x))))
    y  = x1 + c_proj(act(c_fc(ln_2(x1))))

For the 17 tokens of a small ViT (64 images, width 64), the block's modules cost as much in Python, autograd
bookkeeping and elementwise passes as in matmuls: its forward + input gradient took 2.8 ms as open_clip's modules
(with urda_fast's fused attention) on this project's 2-core CPU, and an HPT step runs it 18 times (six image-tower
forwards and backwards of three blocks). The CPU kernel (csrc/cpu/transformer_block.cpp) runs the whole block as one
autograd node: residual and bias in one pass that the matmul accumulates into, the packed attention kernel, and a
backward that computes only the gradients asked for (an attack's input gradient skips every weight gradient).
Backends: ``cpu`` and ``reference`` (torch's functional ops; every GPU tensor).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _backends, _checks, reference
from .attention import _check_mask

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


class BlockWeights(NamedTuple):
    """A block's parameters, as torch's modules keep them: ``nn.LayerNorm`` (E,), ``nn.MultiheadAttention``'s
    ``in_proj_weight`` (3E, E) / ``in_proj_bias`` (3E,) and ``out_proj`` (E, E) / (E,), the MLP's ``c_fc`` (F, E) /
    (F,) and ``c_proj`` (E, F) / (E,)."""

    ln1_weight: torch.Tensor
    ln1_bias: torch.Tensor
    in_weight: torch.Tensor
    in_bias: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor
    ln2_weight: torch.Tensor
    ln2_bias: torch.Tensor
    fc_weight: torch.Tensor
    fc_bias: torch.Tensor
    proj_weight: torch.Tensor
    proj_bias: torch.Tensor


def transformer_block(x, weights, heads, *, mask=None, ln_eps=1e-5, activation="gelu", backend=None):
    """A pre-LayerNorm transformer block, batch first.

    Args:
        x: (B, T, E) floating tensor.
        weights: a :class:`BlockWeights` (or a sequence of its 12 tensors in that order), x's dtype and device.
        heads: attention heads (divides E); the scores' scale is head_dim ** -0.5, as ``nn.MultiheadAttention``.
        mask: None or an additive (T, T) float mask of x's dtype (0 = attend, -inf = masked; a constant).
        ln_eps: both LayerNorms' epsilon.
        activation: the MLP's ``"gelu"`` (``nn.GELU()``), ``"gelu_tanh"`` (``nn.GELU(approximate="tanh")``) or
            ``"quick_gelu"`` (open_clip's ``QuickGELU``, OpenAI's CLIP weights).
        backend: ``"cpu"`` or ``"reference"``; by default float32/float64 CPU tensors take the kernel, everything else
            the reference.

    Returns:
        (B, T, E), differentiable w.r.t. ``x`` and every weight (once: the kernel has no second derivative).
    """
    weights = _check(x, weights, heads, mask, ln_eps, activation)
    scale = (x.shape[2] // heads) ** -0.5
    if _backends.float_cpu_kernel("transformer_block", backend, x, "torch's GPU kernels are fast"):
        mask = mask if mask is None else mask.contiguous()  # the kernel reads it as a dense (T, T) block
        return torch.ops.urda_fast.transformer_block_forward(x.contiguous(), *weights, mask, heads, scale, ln_eps,
                                                             activation)[0]
    return reference.transformer_block(x, weights, heads, mask, ln_eps, activation)


def _check(x, weights, heads, mask, ln_eps, activation) -> BlockWeights:
    _checks.check_tensor(x, "x")
    if x.dim() != 3:
        raise ValueError(f"urda_fast: transformer_block needs x of shape (B, T, E) (batch first), got {tuple(x.shape)}")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or x.shape[2] % heads:
        raise ValueError(f"urda_fast: transformer_block's heads must be a positive int dividing the width "
                         f"{x.shape[2]}, got {heads!r}")
    if len(weights) != len(BlockWeights._fields):
        raise ValueError(f"urda_fast: transformer_block takes {len(BlockWeights._fields)} weights "
                         f"({', '.join(BlockWeights._fields)}), got {len(weights)}")
    weights = BlockWeights(*weights)
    embed, hidden = x.shape[2], weights.fc_weight.shape[0] if weights.fc_weight.dim() == 2 else -1
    shapes = {"ln1_weight": (embed,), "ln1_bias": (embed,), "in_weight": (3 * embed, embed), "in_bias": (3 * embed,),
              "out_weight": (embed, embed), "out_bias": (embed,), "ln2_weight": (embed,), "ln2_bias": (embed,),
              "fc_weight": (hidden, embed), "fc_bias": (hidden,), "proj_weight": (embed, hidden),
              "proj_bias": (embed,)}
    for name, shape in shapes.items():
        t = getattr(weights, name)
        _checks.check_tensor(t, name)
        if tuple(t.shape) != shape or hidden < 1:
            raise ValueError(f"urda_fast: transformer_block's {name} must have shape {shape} for width {embed}, got "
                             f"{tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"urda_fast: transformer_block's {name} is {t.dtype} on {t.device} but x is {x.dtype} on "
                            f"{x.device}; cast the module (.to(x)) or the input")
    if mask is not None:
        _check_mask(mask, x, "transformer_block")
    if not isinstance(ln_eps, (int, float)) or isinstance(ln_eps, bool) or not (math.isfinite(ln_eps) and ln_eps > 0):
        raise ValueError(f"urda_fast: transformer_block's ln_eps must be a positive finite float, got {ln_eps!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"urda_fast: transformer_block's activation must be one of {', '.join(ACTIVATIONS)}, got "
                         f"{activation!r}")
    return weights


def _fake_forward(x, ln1_weight, ln1_bias, in_weight, in_bias, out_weight, out_bias, ln2_weight, ln2_bias, fc_weight,
                  fc_bias, proj_weight, proj_bias, mask, heads, scale, ln_eps, activation):
    batch, tokens, embed = x.shape
    rows, hidden = batch * tokens, fc_weight.shape[0]
    stat = x.new_empty(batch, tokens, 1)
    return (torch.empty_like(x), torch.empty_like(x), stat, stat.clone(), x.new_empty(batch, tokens, 3 * embed),
            torch.empty_like(x), x.new_empty(batch, heads, tokens, tokens), torch.empty_like(x), torch.empty_like(x),
            stat.clone(), stat.clone(), x.new_empty(rows, hidden), x.new_empty(rows, hidden))


def _fake_backward(grad_out, x, ln1, ln1_mean, ln1_rstd, qkv, attn, probs, x1, ln2, ln2_mean, ln2_rstd, h, g,
                   ln1_weight, ln1_bias, in_weight, out_weight, ln2_weight, ln2_bias, fc_weight, proj_weight, heads,
                   scale, activation, needs):
    embed, hidden = x.shape[2], fc_weight.shape[0]
    shapes = [x.shape, (embed,), (embed,), (3 * embed, embed), (3 * embed,), (embed, embed), (embed,), (embed,),
              (embed,), (hidden, embed), (hidden,), (embed, hidden), (embed,)]
    return [x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs)]


def register() -> None:
    """Fake kernels of ``urda_fast::transformer_block_*`` (CPU only: no Triton twin). The forward's autograd is
    registered in C++ (csrc/cpu/transformer_block.cpp): a Python rule cost as much as the block at small sizes."""
    torch.library.register_fake("urda_fast::transformer_block_forward")(_fake_forward)
    torch.library.register_fake("urda_fast::transformer_block_backward")(_fake_backward)
    _backends.forbid_double_backward("urda_fast::transformer_block_backward", "transformer_block")
