"""Attention over short sequences on CPU: :class:`FastMultiheadAttention` (urda_fast's fused kernel for
self-attention) and, for what still runs torch's attention, which of its kernels runs.

torch's CPU ``scaled_dot_product_attention`` picks its flash kernel, which is built for long sequences; for the few
tokens of a small ViT or of a CLIP at 224 with 32-pixel patches, the plain ``math`` kernel (matmuls and a softmax) is
faster. Forward + backward on this 2-core CPU, flash vs math: 17 tokens (the embedded world's tiny ViT, batch 64,
4 heads of 16) 2.7 vs 1.0 ms; 50 tokens (ViT-B-32 at 224, batch 32) 18.2 vs 13.6 ms; 65 tokens 9.2 vs 8.6 ms; but
197 tokens (ViT-B-16) 35.6 vs 43.0 ms and 257 tokens 60 vs 156 ms. On the whole HPT step of the tiny world the
gain depends on the cache state around it: 1.17-1.26x between our own steps, 1.0-1.06x from a flushed cache after
another model's step. GPUs keep torch's choice.

:class:`FastMultiheadAttention` goes further for self-attention (every ViT and CLIP text block): the input projection
as one matmul, then :func:`urda_fast.ops.packed_self_attention`, which reads the heads in place and writes the merged
output, forward and backward, instead of torch's split / batched matmuls / safe softmax / merge. A tiny CLIP block's
attention (64 x 17 tokens, width 64, 4 heads), forward + input gradient, best of 5 on 2 threads: 1.2 ms fused, 2.2
ms as ``nn.MultiheadAttention`` with the math kernel, 3.8 ms with torch's default.
"""

from __future__ import annotations

import contextlib

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import ops
from ._retype import retype

MAX_MATH_TOKENS = 64


def short_sequence_attention(device: torch.device, tokens: int | None):
    """A context in which attention over ``tokens`` tokens on ``device`` runs the faster kernel (math: CPU and at most
    ``MAX_MATH_TOKENS`` tokens; otherwise torch's own choice)."""
    if device.type == "cpu" and tokens is not None and tokens <= MAX_MATH_TOKENS:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def image_tokens(visual) -> int | None:
    """Tokens the attention of an open_clip image tower sees: patches + class token (ViT), or the attention pool's
    final map + its mean token (ModifiedResNet); None when unknown."""
    grid = getattr(visual, "grid_size", None)
    if grid is not None:
        return int(grid[0]) * int(grid[1]) + 1
    size = getattr(visual, "image_size", None)
    if hasattr(visual, "attnpool") and size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        return (height // 32) * (width // 32) + 1
    return None


# The fused path's limit. Forward + input gradient of the attention op alone (packed projection in, merged heads out),
# 2 CPU threads, median of 1.5 s, fused vs torch's math vs its default (flash) kernel, one run: 17 tokens (64
# samples, width 64, 4 heads) 0.35 vs 0.92 vs 1.8 ms; 50 (ViT-B-32 at 224, 32 samples) 9.1 vs 17.8 vs 15.4; 77 (CLIP's
# text, 16, causal mask) 5.0 vs 12.4 vs 10.5; 197 (ViT-B-16, 8) 22.3 vs 38.9 vs 29.0; 257 (4 samples, width 1024)
# 31.5 vs 40.9 vs 32.0. Like the math kernel, it keeps the (B, heads, T, T) probabilities for the backward; flash
# does not.
MAX_FUSED_TOKENS = 200
# ... and its memory guard: the probabilities it keeps for the backward, B x heads x T x T, at most this many bytes per
# call (ViT-B-16 at batch 256 would keep 477 MB per layer); larger calls run torch's module, whose default kernel on
# CPU (flash) keeps none.
MAX_PROBS_BYTES = 256 << 20


class FastMultiheadAttention(nn.MultiheadAttention):
    """A drop-in ``nn.MultiheadAttention`` (same parameters and state dict) whose self-attention on CPU runs
    :func:`urda_fast.ops.packed_self_attention`: query, key and value the same tensor, float32/float64, at most
    ``MAX_FUSED_TOKENS`` tokens and ``MAX_PROBS_BYTES`` of probabilities, no key padding mask, no attention weights
    asked for, no dropout in training, no CPU autocast, an optional (T, T) float or bool ``attn_mask`` (bool: True =
    masked, as torch). Anything else runs torch's module."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if isinstance(query, torch.fx.Proxy):
            # torch.fx traces torch.nn's modules (this one's base included) as leaves: one call_module node, which
            # runs this module (fast path and all) when the traced graph runs. Traced through, its checks would fail.
            tracer = query.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), (query, key, value), dict(
                key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
                average_attn_weights=average_attn_weights, is_causal=is_causal))
        fused, mask = self._fused_mask(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        if not fused:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        x = query if self.batch_first else query.transpose(0, 1)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        out = ops.packed_self_attention(qkv, self.num_heads, mask=mask)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _fused_mask(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
        """(whether the fused path runs, its additive mask or None)."""
        if not (query is key and key is value and query.dim() == 3 and query.device.type == "cpu"
                and query.dtype in (torch.float32, torch.float64) and self.in_proj_weight is not None
                and self.in_proj_weight.dtype == query.dtype):
            return False, None
        if need_weights or key_padding_mask is not None or (is_causal and attn_mask is None):
            return False, None
        if torch.is_autocast_enabled("cpu"):  # the projections would come out in bfloat16: torch's module
            return False, None
        if self.bias_k is not None or self.add_zero_attn or (self.training and self.dropout > 0):
            return False, None
        tokens = query.shape[1] if self.batch_first else query.shape[0]
        probs_bytes = query.numel() // query.shape[-1] * self.num_heads * tokens * query.element_size()
        if tokens > MAX_FUSED_TOKENS or probs_bytes > MAX_PROBS_BYTES or ops._backends.native_cpu_error() is not None:
            return False, None
        if attn_mask is None:
            return True, None
        if attn_mask.shape != (tokens, tokens) or attn_mask.requires_grad or attn_mask.device != query.device:
            return False, None
        if attn_mask.dtype == torch.bool:
            return True, torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(attn_mask, float("-inf"))
        return attn_mask.is_floating_point(), attn_mask.to(query.dtype)


def use_fast_attention(model: nn.Module) -> nn.Module:
    """Turn every ``nn.MultiheadAttention`` of ``model`` into :class:`FastMultiheadAttention`, in place (the class
    changes, the parameters stay); returns the model."""
    return retype(model, nn.MultiheadAttention, FastMultiheadAttention)


def use_torch_attention(model: nn.Module) -> nn.Module:
    """The inverse of :func:`use_fast_attention` (benchmarks' plain-PyTorch twins)."""
    return retype(model, FastMultiheadAttention, nn.MultiheadAttention)
