"""Backbone registry: name -> nn.Module with ``out_features``. Weights only from local files, never downloaded.

Their max pooling is :class:`urda_fast.models.MaxPool2d` (torch's values and gradients, a vectorised CPU kernel),
their convolutions :class:`urda_fast.models.FastConv2d` (CPU fast paths for a single output position and for
image inputs), and their eval-mode BatchNorm -> ReLU pairs one op each on large CPU inputs
(:class:`urda_fast.models.FastSequential` in the digits CNN, :func:`urda_fast.models.use_fast_resnet` in the ResNets)."""

from __future__ import annotations

import os

import torch.nn as nn

from urda_fast.files import load_torch_file, state_dict_mismatch

from .batch_norm import use_fast_batch_norm, use_fast_resnet
from .conv import use_fast_conv
from .pooling import MaxPool2d, use_fast_pooling


class DigitsCNN(nn.Module):
    """A LeNet/DTN-size CNN for small grey digits (16x16 or 28x28 or 32x32): 3 conv blocks -> 128-d features."""

    def __init__(self, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.out_features = 2 * width * 4
        use_fast_conv(self)  # the first layer's input gradient (attacks) through urda_fast's kernel
        use_fast_batch_norm(self)  # eval-mode BatchNorm -> ReLU pairs (attacks) as one op

    def forward(self, x):
        return self.net(x)


def _torchvision_resnet(name: str, weights: str | None, in_channels: int = 3):
    import torchvision

    if in_channels != 3:
        raise ValueError(f"urda_fast: {name} takes 3-channel (RGB) images, and this data has {in_channels} "
                         f"channel(s); for grey digits use the digits_cnn backbone (--arch digits_cnn)")
    model = getattr(torchvision.models, name)(weights=None)
    if weights:
        check_backbone_weights(name, weights)
        state = _backbone_state(load_torch_file(weights, who="urda_fast backbone", weights_only=True))
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shapes of another network (resnet18 weights for a resnet50)
            raise ValueError(f"urda_fast: {weights!r} is not a {name} checkpoint ({state_dict_mismatch(err)})") \
                from err
        if len([k for k in missing if not k.startswith("fc.")]) or unexpected:
            raise ValueError(f"urda_fast: {weights!r} is not a {name} checkpoint (missing {missing[:3]}..., "
                             f"unexpected {unexpected[:3]}...)")
    out_features = model.fc.in_features
    model.fc = nn.Identity()
    model.out_features = out_features
    return use_fast_conv(use_fast_pooling(use_fast_resnet(model)))


def _backbone_state(state):
    """The weights inside the usual containers of a training script's checkpoint: ``{"state_dict": ...}`` or
    ``{"model": ...}``, keys prefixed ``module.`` (DistributedDataParallel) -- else the file as it is."""
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
        if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _digits_cnn(weights=None, **kwargs):
    check_backbone_weights("digits_cnn", weights)
    return DigitsCNN(**kwargs)


BACKBONES = {
    "digits_cnn": _digits_cnn,
    "resnet18": lambda weights=None, in_channels=3: _torchvision_resnet("resnet18", weights, in_channels),
    "resnet50": lambda weights=None, in_channels=3: _torchvision_resnet("resnet50", weights, in_channels),
}


# Backbones trained from scratch only: no published pretrained weights exist for them.
NO_PRETRAINED = frozenset({"digits_cnn"})


def check_backbone_weights(name: str, weights: str | None = None) -> None:
    """A clear error, before any work, for an unknown backbone or weights it cannot take: ``digits_cnn`` has no
    pretrained weights (they would be ignored), a ResNet's file must exist. Whether a file holds the right weights is
    checked when they are loaded."""
    if name not in BACKBONES:
        raise ValueError(f"urda_fast: unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if weights and name in NO_PRETRAINED:
        raise ValueError(f"urda_fast: the {name} backbone takes no pretrained weights (there are none: it trains from "
                         f"random init), got backbone weights {weights!r}; drop --backbone-weights, or pick a ResNet "
                         "(--arch resnet18|resnet50) for a pretrained backbone")
    if weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"urda_fast: backbone weights {weights!r} not found; pass a local .pth file of "
                                f"torchvision's {name} (nothing is downloaded), or no weights for random init")


def create_backbone(name: str, weights: str | None = None, **kwargs) -> nn.Module:
    check_backbone_weights(name, weights)
    return BACKBONES[name](weights=weights, **kwargs)
