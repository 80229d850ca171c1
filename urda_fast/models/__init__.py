"""Models: the tllib classifier layout over a backbone registry."""

from .backbones import BACKBONES, DigitsCNN, create_backbone
from .classifier import ImageClassifier, Normalize
from .spec import ModelSpec

__all__ = ["BACKBONES", "DigitsCNN", "ImageClassifier", "ModelSpec", "Normalize", "create_backbone"]
