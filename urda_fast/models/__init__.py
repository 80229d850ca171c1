"""Models: the tllib classifier layout over a backbone registry."""

from .backbones import BACKBONES, DigitsCNN, create_backbone
from .classifier import ImageClassifier, Normalize
from .pooling import MaxPool2d, use_fast_pooling, use_torch_pooling
from .spec import ModelSpec

__all__ = ["BACKBONES", "DigitsCNN", "ImageClassifier", "MaxPool2d", "ModelSpec", "Normalize", "create_backbone",
           "use_fast_pooling", "use_torch_pooling"]
