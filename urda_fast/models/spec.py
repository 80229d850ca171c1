"""What a checkpoint needs to rebuild its model: a small dataclass saved beside the weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .backbones import create_backbone
from .classifier import ImageClassifier


@dataclass
class ModelSpec:
    backbone: str = "digits_cnn"
    num_classes: int = 10
    bottleneck_dim: int = 256
    mean: tuple = (0.5,)
    std: tuple = (0.5,)
    backbone_weights: str | None = None  # a local file; only used when building a fresh model
    layout: str = "standard"  # ImageClassifier's: "standard" | "mdd" (checkpoints from before it: standard)

    def build(self, with_weights: bool = True) -> ImageClassifier:
        # the data's channels (one mean per channel): the digits CNN takes any, a ResNet says it needs 3
        backbone = create_backbone(self.backbone, weights=self.backbone_weights if with_weights else None,
                                   in_channels=len(self.mean))
        # tllib's rule: a pretrained backbone is fine-tuned at 0.1x the learning rate, a random one (its --scratch)
        # trains at the full rate.
        pretrained = bool(with_weights and self.backbone_weights)
        return ImageClassifier(backbone, self.num_classes, bottleneck_dim=self.bottleneck_dim, mean=self.mean,
                               std=self.std, finetune_backbone=pretrained, layout=self.layout)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{k: tuple(v) if k in ("mean", "std") else v for k, v in known.items()})
