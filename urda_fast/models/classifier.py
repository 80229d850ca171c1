"""The Transfer-Learning-Library classifier layout: backbone -> bottleneck -> head, with the input normalisation
inside the model so attacks work on [0, 1] pixels."""

from __future__ import annotations

import torch
import torch.nn as nn


class Normalize(nn.Module):
    """(x - mean) / std per channel, as a layer: the model takes [0, 1] images."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


LAYOUTS = ("standard", "mdd")


def mdd_head(in_features: int, num_classes: int, width: int = 1024, dropout: float = 0.5) -> nn.Sequential:
    """tllib's MDD classifier head: Linear(in, width)-ReLU-Dropout-Linear(width, K), weights N(0, 0.01), biases 0.

    Both heads of tllib's MDD classifier (the main one, ``layout="mdd"``, and MDD's adversarial one)."""
    head = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, num_classes))
    for layer in (head[0], head[3]):
        nn.init.normal_(layer.weight, 0.0, 0.01)
        nn.init.zeros_(layer.bias)
    return head


def _bottleneck(in_features: int, width: int, layout: str) -> nn.Sequential:
    layers = [nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU()]
    if layout == "mdd":  # tllib's MDD classifier: dropout after the bottleneck, and its own initialisation
        layers.append(nn.Dropout(0.5))
        nn.init.normal_(layers[0].weight, 0.0, 0.005)
        nn.init.constant_(layers[0].bias, 0.1)
    return nn.Sequential(*layers)


class ImageClassifier(nn.Module):
    """backbone -> bottleneck (Linear, BatchNorm1d, ReLU) -> head (Linear), tllib's ImageClassifier.

    Args:
        backbone: images -> (B, backbone.out_features) features.
        num_classes: K.
        bottleneck_dim: width of the bottleneck (tllib: 256; 1024 for MDD). 0 = no bottleneck.
        mean, std: input normalisation (per channel); the model takes [0, 1] images.
        layout: ``"standard"`` (above) or ``"mdd"``, tllib's MDD classifier: the bottleneck ends in Dropout(0.5)
            (Linear weights N(0, 0.005), bias 0.1) and the head is :func:`mdd_head` as wide as the bottleneck.

    ``forward(x)`` returns logits (B, K); ``forward(x, return_features=True)`` returns (logits, bottleneck features).
    ``param_groups(lr)`` gives the backbone 0.1x the learning rate when ``finetune_backbone`` (its weights were
    pretrained or trained before), as tllib does, and the full rate otherwise (tllib's ``--scratch``).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, bottleneck_dim: int = 256, mean=(0.5,), std=(0.5,),
                 head: nn.Module | None = None, finetune_backbone: bool = True, layout: str = "standard"):
        super().__init__()
        if not bottleneck_dim >= 0:  # NaN too
            raise ValueError(f"urda_fast: bottleneck_dim must be >= 0 (0: no bottleneck), got {bottleneck_dim}")
        if layout not in LAYOUTS:
            raise ValueError(f"urda_fast: unknown classifier layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        if layout == "mdd" and not bottleneck_dim:
            raise ValueError("urda_fast: the 'mdd' classifier layout needs a bottleneck (bottleneck_dim > 0; "
                             "tllib: 1024)")
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        in_features = backbone.out_features
        if bottleneck_dim:
            self.bottleneck = _bottleneck(in_features, bottleneck_dim, layout)
            self.features_dim = bottleneck_dim
        else:
            self.bottleneck = nn.Identity()
            self.features_dim = in_features
        if head is None:
            head = (mdd_head(bottleneck_dim, num_classes, width=bottleneck_dim) if layout == "mdd"
                    else nn.Linear(self.features_dim, num_classes))
        self.head = head
        self.layout = layout
        self.num_classes = num_classes
        self.finetune_backbone = finetune_backbone

    def forward(self, x, return_features: bool = False):
        features = self.bottleneck(self.backbone(self.normalize(x)))
        logits = self.head(features)
        return (logits, features) if return_features else logits

    def param_groups(self, base_lr: float):
        backbone_lr = 0.1 * base_lr if self.finetune_backbone else base_lr
        return [
            {"params": self.backbone.parameters(), "lr": backbone_lr, "initial_lr": backbone_lr},
            {"params": self.bottleneck.parameters(), "lr": base_lr, "initial_lr": base_lr},
            {"params": self.head.parameters(), "lr": base_lr, "initial_lr": base_lr},
        ]
