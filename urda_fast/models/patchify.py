"""``PatchConv2d``: a ViT's patch embedding (a convolution whose stride equals its kernel) as a reshape and a matmul
on CPU. oneDNN's convolution backward is slow for this shape: forward + input gradient of the tiny CLIP target's
8x8/stride-8 patch embedding on a 64x3x32x32 batch takes 4.1 ms as a convolution and 0.7 ms as a matmul, and an HPT
step runs it six times. The same function (float rounding aside); any other configuration, or a GPU tensor, runs
the convolution."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


def _is_patch_embedding(conv: nn.Conv2d) -> bool:
    return (conv.stride == conv.kernel_size and conv.kernel_size != (1, 1) and conv.padding in ((0, 0), "valid")
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


class PatchConv2d(nn.Conv2d):
    """A drop-in ``nn.Conv2d`` (same parameters and state dict). Non-overlapping, unpadded, ungrouped, undilated
    convolutions of CPU tensors run as patches @ weight."""

    def forward(self, x):
        if x.device.type != "cpu" or x.dim() != 4 or not _is_patch_embedding(self):
            return super().forward(x)
        kh, kw = self.kernel_size
        batch, channels, height, width = x.shape
        rows, cols = height // kh, width // kw
        x = x[:, :, :rows * kh, :cols * kw]  # floor mode, as the convolution
        patches = x.reshape(batch, channels, rows, kh, cols, kw).permute(0, 2, 4, 1, 3, 5)
        out = F.linear(patches.reshape(batch * rows * cols, channels * kh * kw),
                       self.weight.reshape(self.out_channels, -1), self.bias)
        return out.reshape(batch, rows, cols, self.out_channels).permute(0, 3, 1, 2)


def use_patch_matmul(model: nn.Module) -> nn.Module:
    """Turn every unpadded ``nn.Conv2d`` of ``model`` whose stride equals its kernel (patch embeddings) into
    :class:`PatchConv2d`, in place (the class changes, the parameters stay); returns the model."""
    for module in model.modules():
        if type(module) is nn.Conv2d and _is_patch_embedding(module):
            module.__class__ = PatchConv2d
    return model
