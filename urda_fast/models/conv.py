"""``FastConv2d``: ``nn.Conv2d`` with three exact CPU fast paths for shapes oneDNN's convolution handles slowly.

- Patch embedding (stride = kernel, no padding, a ViT's first layer): a reshape and a matmul. Forward + input
  gradient of the tiny CLIP target's 8x8/stride-8 embedding on a 64x3x32x32 batch: 4.1 ms as a convolution, 0.7 ms
  as a matmul, and an HPT step runs it six times.
- A single output position (ResNet's last stage on 32x32 images: 3x3 convolutions of 1x1 maps, and its first,
  stride 2 from a 2x2 map): the taps that meet the input form one block of the weight, so the convolution is a
  linear layer on the input window it reads. 16x512x1x1 through a 3x3 512->512 convolution, forward + input
  gradient: 2.0 ms in oneDNN, 0.33 ms as the linear layer (three per ResNet-18 forward); 16x256x2x2 through the 3x3
  stride-2 256->512 one: 2.35 -> 0.59 ms. (Larger maps gain nothing: a 2x2 -> 2x2 convolution as one matrix reads
  a weight 16/9 the size, and at 4x4 most of that matrix would be zeros.)
- An input with 1-4 channels that requires grad (an image model's first layer under attack): the input gradient is
  :func:`urda_fast.ops.conv2d`'s kernel (ResNet's 7x7/2 stem on 16x3x32x32: 2.0 -> 0.9 ms per attack step).

All compute the same sums as the convolution (the terms it adds on zero padding dropped); anything else, and every
GPU tensor, runs the convolution."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops._memo import VersionedMemo
from ._retype import retype
from .attention import use_torch_attention
from .batch_norm import use_torch_batch_norm
from .pooling import use_torch_pooling


def _plain(conv: nn.Conv2d) -> bool:
    return conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"


def _is_patch_embedding(conv: nn.Conv2d) -> bool:
    return (conv.stride == conv.kernel_size and conv.kernel_size != (1, 1) and conv.padding in ((0, 0), "valid")
            and _plain(conv))


def _single_output_window(conv: nn.Conv2d, x) -> tuple[int, int] | None:
    """(rows, columns) of the input that a convolution with a single output position reads (from the top left corner:
    the taps from (padding_h, padding_w) on), or None for any other convolution. A 1x1 kernel on a 1x1 map is left
    to the convolution, a matmul already."""
    if isinstance(conv.padding, str) or not _plain(conv):
        return None
    (kh, kw), (ph, pw), (sh, sw) = conv.kernel_size, conv.padding, conv.stride
    height, width = x.shape[-2:]
    if (height + 2 * ph - kh) // sh != 0 or (width + 2 * pw - kw) // sw != 0:
        return None  # several output positions, or an input smaller than the kernel (the convolution's error)
    if (kh, kw) == (1, 1) and (height, width) == (1, 1):
        return None
    rows, cols = min(height, kh - ph), min(width, kw - pw)
    return (rows, cols) if rows >= 1 and cols >= 1 else None


# Contiguous weight blocks of weights that did not change since (see ops/_memo.py).
_WINDOW_WEIGHTS = VersionedMemo()


def _window_weight(weight, padding, window):
    """The taps ``weight[:, :, ph:ph + rows, pw:pw + cols]`` as a contiguous (O, I * rows * cols) matrix: a strided
    one costs the matmul twice its time, and the copy about as much again (0.4 ms for a 512x512 centre tap, three of
    them per ResNet-18 forward). An attack runs many forwards with frozen weights, so inside its ``memo_scope`` the copy
    of a weight that needs no gradient is kept until the weight changes (its version counter) or dies."""
    (ph, pw), (rows, cols) = padding, window

    def block():
        return weight[:, :, ph:ph + rows, pw:pw + cols].reshape(weight.shape[0], -1).contiguous()

    if torch.compiler.is_compiling() or weight.requires_grad or weight.is_inference():  # is_inference breaks tracing
        return block()
    hit = _WINDOW_WEIGHTS.get((weight,))
    if hit is not None and hit[0] == (padding, window):
        return hit[1]
    taps = block()
    _WINDOW_WEIGHTS.put((weight,), ((padding, window), taps))
    return taps


class FastConv2d(nn.Conv2d):
    """A drop-in ``nn.Conv2d`` (same parameters and state dict) with the fast paths above for CPU tensors. They live in
    ``_conv_forward``, so code that convolves with other weights through it (the attacks' BatchNorm folding) takes
    them too. ``torch.fx``, ``torch.export`` and ``torch.jit.trace`` take it as it is; ``torch.jit.script`` (in
    maintenance in torch) does not: ``plain_torch(model)`` first. Under ``torch.jit.trace`` it is torch's
    convolution: a trace records one branch, and the fast paths branch on the input's size and grad mode. The patch
    embedding's output is laid out channels-last, as its matmul writes it (a copy to NCHW cost 20% of that path):
    ``.reshape`` and ``.flatten`` take it as torch's output, ``.view(B, -1)`` does not."""

    def _conv_forward(self, x, weight, bias):
        # isinstance first: under torch.fx tracing x is a Proxy (traced as torch's convolution, no fast path).
        if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dim() == 4 and not torch.jit.is_tracing():
            kh, kw = self.kernel_size
            if _is_patch_embedding(self) and x.shape[-2] >= kh and x.shape[-1] >= kw:
                return self._patch_embedding(x, weight, bias)
            window = _single_output_window(self, x)
            if window is not None:
                rows, cols = window
                read = x if (rows, cols) == tuple(x.shape[-2:]) else x[:, :, :rows, :cols]
                out = F.linear(read.flatten(1), _window_weight(weight, tuple(self.padding), window), bias)
                return out.reshape(x.shape[0], self.out_channels, 1, 1)
            if self.in_channels <= ops.conv.MAX_CHANNELS and x.requires_grad and _plain(self):
                return ops.conv2d(x, weight, bias, self.stride, self.padding)  # F.conv2d where the kernel cannot run
        return super()._conv_forward(x, weight, bias)

    def _patch_embedding(self, x, weight, bias):
        kh, kw = self.kernel_size
        batch, channels, height, width = x.shape
        rows, cols = height // kh, width // kw
        x = x[:, :, :rows * kh, :cols * kw]  # floor mode, as the convolution
        patches = x.reshape(batch, channels, rows, kh, cols, kw).permute(0, 2, 4, 1, 3, 5)
        out = F.linear(patches.reshape(batch * rows * cols, channels * kh * kw), weight.reshape(self.out_channels, -1),
                       bias)
        return out.reshape(batch, rows, cols, self.out_channels).permute(0, 3, 1, 2)


def use_fast_conv(model: nn.Module) -> nn.Module:
    """Turn every ``nn.Conv2d`` of ``model`` into :class:`FastConv2d`, in place (the class changes, the parameters
    stay); returns the model."""
    return retype(model, nn.Conv2d, FastConv2d)


def use_torch_conv(model: nn.Module) -> nn.Module:
    """The inverse of :func:`use_fast_conv` (benchmarks' plain-PyTorch twins)."""
    return retype(model, FastConv2d, nn.Conv2d)


def plain_torch(model: nn.Module) -> nn.Module:
    """``model`` (in place) with torch's own convolution, pooling, attention and sequential modules: the plain-PyTorch
    twin that the benchmarks compare against."""
    for module in model.modules():  # classes defined where their base is imported (open_clip's blocks)
        torch_class = getattr(type(module), "torch_class", None)
        if torch_class is not None:
            module.__class__ = torch_class
    return use_torch_batch_norm(use_torch_attention(use_torch_conv(use_torch_pooling(model))))
