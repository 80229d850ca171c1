"""open_clip's transformer blocks as one op on CPU: :class:`FastResidualAttentionBlock`.

CLIP's image and text towers are stacks of ``open_clip.transformer.ResidualAttentionBlock`` (pre-LayerNorm
attention and MLP, each with a residual). For short sequences on CPU the block's ~20 modules and ~40 autograd nodes,
their bias copies and GELU passes cost as much as its matmuls; :func:`urda_fast.ops.transformer_block` runs the whole
block as one op, forward and backward, with the same parameters and values (to float32 rounding). The tiny CLIP's
image block (64 images x 17 tokens, width 64), forward + input gradient on this project's 2-core CPU: 1.65 ms fused,
2.17 ms as open_clip's modules with urda_fast's fused attention inside.

This module imports open_clip; :func:`urda_fast.models.plain_torch` turns the blocks back without it.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
from open_clip.transformer import LayerNorm, QuickGELU, ResidualAttentionBlock

from ..ops._backends import cpu_only_choice
from ._hooks import global_hooks, intercepted
from ._retype import retype
from .attention import FastMultiheadAttention

# The MLP activations the op computes, by module: nn.GELU by its ``approximate`` attribute.
_GELU = {"none": "gelu", "tanh": "gelu_tanh"}


class FastResidualAttentionBlock(ResidualAttentionBlock):
    """A drop-in ``ResidualAttentionBlock`` (same parameters, state dict and submodules) whose forward on CPU is
    :func:`urda_fast.ops.transformer_block` when the block is the plain one: self-attention through
    :class:`FastMultiheadAttention`'s fused path (its conditions: batch first, float32/float64, no autocast, at most
    200 tokens, no dropout in training, a (T, T) mask or none), no layer scale, no cross-attention, torch's or
    open_clip's ``LayerNorm`` with equal eps, a ``GELU`` (either approximation) or ``QuickGELU`` MLP with biases,
    and no hooks on its submodules (the fused op would skip them). Anything else, torch.fx tracing,
    ``torch.compile`` (which fuses the modules its own way; as fast, measured) and ``torch.func`` transforms run
    open_clip's forward."""

    torch_class = ResidualAttentionBlock  # what plain_torch() turns it back into

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        activation, mask = self._fused_path(q_x, k_x, v_x, attn_mask)
        if activation is None:
            return super().forward(q_x, k_x=k_x, v_x=v_x, attn_mask=attn_mask)
        attn, mlp = self.attn, self.mlp
        # The op itself (its Python wrapper's checks hold by construction here; the kernel checks shapes again).
        return torch.ops.urda_fast.transformer_block_forward(
            q_x.contiguous(), self.ln_1.weight, self.ln_1.bias, attn.in_proj_weight, attn.in_proj_bias,
            attn.out_proj.weight, attn.out_proj.bias, self.ln_2.weight, self.ln_2.bias, mlp.c_fc.weight,
            mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias, mask, attn.num_heads, attn.head_dim ** -0.5,
            self.ln_1.eps, activation)[0]

    def _fused_path(self, q_x, k_x, v_x, attn_mask):
        """(the op's activation name, its additive mask), or (None, None) for open_clip's forward."""
        if isinstance(q_x, torch.fx.Proxy) or torch.compiler.is_compiling():
            return None, None
        # torch.func transforms take no C++ autograd Function; URDA_FAST_BACKEND=reference asks for torch's layers
        if cpu_only_choice("transformer_block", None, "") == "reference":
            return None, None
        if k_x is not None or v_x is not None or hasattr(self, "ln_1_kv"):
            return None, None
        if not (type(self.ls_1) is nn.Identity and type(self.ls_2) is nn.Identity):
            return None, None
        attn, mlp, ln_1, ln_2 = self.attn, self.mlp, self.ln_1, self.ln_2
        if (type(attn) is not FastMultiheadAttention or not attn.batch_first or attn.in_proj_bias is None
                or attn.out_proj.bias is None):
            return None, None
        if not all(type(ln) in (nn.LayerNorm, LayerNorm) and ln.weight is not None and ln.bias is not None
                   for ln in (ln_1, ln_2)) or ln_1.eps != ln_2.eps:
            return None, None
        activation = _activation(mlp)
        if activation is None or self._intercepted() or q_x.dtype != ln_1.weight.dtype:
            return None, None
        # open_clip's attention() casts the mask to the input's dtype before nn.MultiheadAttention sees it: a bool
        # mask becomes additive 0 / 1, not torch's True = masked.
        attn_mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        fused, mask = attn._fused_mask(q_x, q_x, q_x, None, False, attn_mask, False)
        if not fused:
            return None, None
        # The kernel reads the mask as a dense (T, T) block; open_clip takes any view (a slice of a longer mask).
        return activation, mask if mask is None else mask.contiguous()

    def _intercepted(self) -> bool:
        """Hooks on a submodule, or a forward replaced on one: the fused op would skip either. The submodules are
        walked directly: named_modules() took ~0.1 ms a call, 2 ms of a tiny HPT step."""
        if global_hooks():
            return True
        stack = list(self._modules.values())
        while stack:
            module = stack.pop()
            if module is not None:
                if intercepted(module):
                    return True
                stack.extend(module._modules.values())
        return False


def _activation(mlp) -> str | None:
    """The op's name for the MLP's activation, or None if the MLP is not Linear -> activation -> Linear with biases."""
    if type(mlp) is not nn.Sequential or list(mlp._modules) != ["c_fc", "gelu", "c_proj"]:
        return None
    if not (type(mlp.c_fc) is nn.Linear and type(mlp.c_proj) is nn.Linear and mlp.c_fc.bias is not None
            and mlp.c_proj.bias is not None):
        return None
    act = mlp.gelu
    if type(act) is nn.GELU:
        return _GELU.get(act.approximate)
    return "quick_gelu" if type(act) is QuickGELU else None


def use_fast_blocks(model: nn.Module) -> nn.Module:
    """Turn every open_clip ``ResidualAttentionBlock`` of ``model`` into :class:`FastResidualAttentionBlock`, in place
    (the class changes, the parameters stay); returns the model. The fused path needs the blocks' attention to be
    :class:`FastMultiheadAttention` (:func:`urda_fast.models.use_fast_attention`)."""
    return retype(model, ResidualAttentionBlock, FastResidualAttentionBlock)
