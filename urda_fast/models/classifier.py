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


class ImageClassifier(nn.Module):
    """backbone -> bottleneck (Linear, BatchNorm1d, ReLU) -> head (Linear), tllib's ImageClassifier.

    Args:
        backbone: images -> (B, backbone.out_features) features.
        num_classes: K.
        bottleneck_dim: width of the bottleneck (tllib: 256; 1024 for MDD). 0 = no bottleneck.
        mean, std: input normalisation (per channel); the model takes [0, 1] images.

    ``forward(x)`` returns logits (B, K); ``forward(x, return_features=True)`` returns (logits, bottleneck features).
    ``param_groups(lr)`` gives the backbone 0.1x the learning rate when ``finetune_backbone`` (its weights were
    pretrained or trained before), as tllib does, and the full rate otherwise (tllib's ``--scratch``).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, bottleneck_dim: int = 256, mean=(0.5,), std=(0.5,),
                 head: nn.Module | None = None, finetune_backbone: bool = True):
        super().__init__()
        if not bottleneck_dim >= 0:  # NaN too
            raise ValueError(f"urda_fast: bottleneck_dim must be >= 0 (0: no bottleneck), got {bottleneck_dim}")
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        in_features = backbone.out_features
        if bottleneck_dim:
            self.bottleneck = nn.Sequential(nn.Linear(in_features, bottleneck_dim), nn.BatchNorm1d(bottleneck_dim),
                                            nn.ReLU())
            self.features_dim = bottleneck_dim
        else:
            self.bottleneck = nn.Identity()
            self.features_dim = in_features
        self.head = head if head is not None else nn.Linear(self.features_dim, num_classes)
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
