"""Which of torch's attention kernels a short sequence runs on CPU.

torch's CPU ``scaled_dot_product_attention`` picks its flash kernel, which is built for long sequences; for the few
tokens of a small ViT or of a CLIP at 224 with 32-pixel patches, the plain ``math`` kernel (matmuls and a softmax) is
faster. Forward + backward on this 2-core CPU, flash vs math: 17 tokens (the embedded world's tiny ViT, batch 64,
4 heads of 16) 2.7 vs 1.0 ms; 50 tokens (ViT-B-32 at 224, batch 32) 18.2 vs 13.6 ms; 65 tokens 9.2 vs 8.6 ms; but
197 tokens (ViT-B-16) 35.6 vs 43.0 ms and 257 tokens 60 vs 156 ms. On the whole HPT step of the tiny world the
gain depends on the cache state around it: 1.17-1.26x between our own steps, 1.0-1.06x from a flushed cache after
another model's step. GPUs keep torch's choice.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

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
