"""Models: the tllib classifier layout over a backbone registry."""

from .attention import FastMultiheadAttention, use_fast_attention, use_torch_attention
from .backbones import BACKBONES, DigitsCNN, create_backbone
from .batch_norm import FastSequential, use_fast_batch_norm, use_fast_resnet, use_torch_batch_norm
from .classifier import LAYOUTS, ImageClassifier, Normalize, mdd_head
from .conv import FastConv2d, plain_torch, use_fast_conv, use_torch_conv
from .pooling import MaxPool2d, use_fast_pooling, use_torch_pooling
from .spec import ModelSpec

__all__ = ["BACKBONES", "DigitsCNN", "FastConv2d", "FastMultiheadAttention", "FastSequential", "ImageClassifier",
           "LAYOUTS", "MaxPool2d", "ModelSpec", "Normalize", "create_backbone", "mdd_head", "plain_torch",
           "use_fast_attention", "use_fast_batch_norm", "use_fast_conv", "use_fast_pooling", "use_fast_resnet",
           "use_torch_attention", "use_torch_batch_norm", "use_torch_conv", "use_torch_pooling"]
