"""Models: the tllib classifier layout over a backbone registry."""

from .backbones import BACKBONES, DigitsCNN, create_backbone
from .classifier import ImageClassifier, Normalize
from .patchify import PatchConv2d, use_patch_matmul
from .pooling import MaxPool2d, use_fast_pooling, use_torch_pooling
from .spec import ModelSpec

__all__ = ["BACKBONES", "DigitsCNN", "ImageClassifier", "MaxPool2d", "ModelSpec", "Normalize", "PatchConv2d",
           "create_backbone", "use_fast_pooling", "use_patch_matmul", "use_torch_pooling"]
