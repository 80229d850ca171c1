r"""Zero-shot classification with a CLIP: images in [0, 1] -> logits over class names, with the text side cached.

    head = ZeroShotClassifier(clip, tokenizer, ["cat", "dog"], ["This is a photo of a {}"])
    logits = head(images)                  # images (B, 3, H, W) in [0, 1]; the head resizes and normalises

The class embeddings are :math:`t_c = \mathrm{normalize}(\frac1T \sum_j \mathrm{normalize}(E_T(\text{template}_j(c))))`
and the logits :math:`\langle \mathrm{normalize}(E_I(x)), t_c\rangle` -- times :math:`\exp(\text{logit\_scale})` in
``"clip"`` mode. Preprocessing lives inside the module, so attacks work on [0, 1] pixels.
"""

from __future__ import annotations

import contextlib
import string

import torch
import torch.nn.functional as F
from torch import nn

from ..models.attention import image_tokens, short_sequence_attention

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
PREPROCESS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}
LOGITS = ("cosine", "clip")
DEFAULT_TEMPLATES = ("This is a photo of a {}",)


def parse_templates(text) -> tuple:
    """``"a photo of a {}|a drawing of a {}"`` (or a sequence) -> a tuple of templates, each holding one ``{}``."""
    templates = tuple(t.strip() for t in text.split("|")) if isinstance(text, str) else tuple(text)
    bad = [t for t in templates if not _one_class_field(t)]
    if not templates or bad:
        raise ValueError(f"hpt: each zero-shot template needs exactly one '{{}}' for the class name and no other "
                         f"format field (a literal brace is written '{{{{' or '}}}}'), got {bad or text!r}")
    return templates


def _one_class_field(template) -> bool:
    """Whether str.format puts the class name into ``template`` once: '{{}}' is a literal '{}', '{name}' a KeyError."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except (ValueError, TypeError):  # "Single '}' encountered", a non-string
        return False
    return fields == [("", "", None)]


# Prompts per text-tower forward. ImageNet's 1000 classes x 80 templates in one call took 3.8 GB on the tiny world's
# 64-wide, 16-token text tower, and ViT-B-32's holds 38x more activations per prompt: no GPU fits that.
TEXT_BATCH = 1024


def class_embeddings(clip, tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, D) unit class embeddings from the tokens of C x T prompts (class-major), averaged over templates. The
    prompts go through the text tower ``TEXT_BATCH`` at a time."""
    with short_sequence_attention(tokens.device, tokens.shape[1]):
        features = torch.cat([F.normalize(clip.encode_text(part).float(), dim=-1)
                              for part in tokens.split(TEXT_BATCH)])
    features = features.reshape(num_classes, -1, features.shape[-1]).mean(1)
    return F.normalize(features, dim=-1)


class ZeroShotClassifier(nn.Module):
    """A CLIP and a list of class names as a classifier of [0, 1] images.

    Args:
        clip: an open_clip CLIP (``encode_image``, ``encode_text``, ``logit_scale``).
        tokenizer: its tokenizer (list of str -> (N, L) tokens).
        classnames: the C class names; templates: prompts with one ``{}`` each.
        logits: ``"cosine"`` (cosine similarities, no scale: the code's convention) or ``"clip"`` (x exp(logit_scale)).
        preprocess: ``"imagenet"`` (the code's mean/std) or ``"clip"`` (CLIP's).
        cache_text: compute the class embeddings once (no graph) and reuse them; for a frozen text tower. With False
            they are recomputed, with gradients, at every call (a trained text tower).

    Shape:
        images (B, 3, H, W) in [0, 1], resized (bicubic, as the code) to the model's input size if needed;
        logits (B, C).
    """

    def __init__(self, clip, tokenizer, classnames, templates=DEFAULT_TEMPLATES, *, logits="cosine",
                 preprocess="imagenet", cache_text=True):
        super().__init__()
        if logits not in LOGITS:
            raise ValueError(f"hpt: logits must be one of {LOGITS}, got {logits!r}")
        if preprocess not in PREPROCESS:
            raise ValueError(f"hpt: preprocess must be one of {tuple(PREPROCESS)}, got {preprocess!r}")
        if not classnames:
            raise ValueError("hpt: a zero-shot head needs at least one class name")
        self.clip, self.mode, self.cache_text = clip, logits, cache_text
        self.classnames, self.templates = list(classnames), parse_templates(templates)
        mean, std = PREPROCESS[preprocess]
        device = next(clip.parameters()).device
        self.register_buffer("mean", torch.tensor(mean, device=device).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, device=device).reshape(1, 3, 1, 1), persistent=False)
        prompts = [t.format(c) for c in self.classnames for t in self.templates]
        self.register_buffer("tokens", tokenizer(prompts).to(device), persistent=False)
        self.register_buffer("cached_text", None, persistent=False)
        size = getattr(clip.visual, "image_size", None)
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size) if size else None
        self.image_tokens = image_tokens(clip.visual)
        self._pinned = None

    # -------------------------------------------------------------------------------------------------- text side
    def text_features(self) -> torch.Tensor:
        """(C, D) unit class embeddings: the cache when ``cache_text`` (computed on first use), else fresh."""
        if not self.cache_text:
            return class_embeddings(self.clip, self.tokens, len(self.classnames))
        if self.cached_text is None:
            # Outside inference mode: an inference tensor could not be saved for a later backward through the logits.
            with torch.inference_mode(False), torch.no_grad():
                self.cached_text = class_embeddings(self.clip, self.tokens, len(self.classnames))
        return self.cached_text

    def refresh_text(self) -> None:
        """Forget the cached class embeddings (after the text tower changed)."""
        self.cached_text = None

    @contextlib.contextmanager
    def pinned_text(self, text_features: torch.Tensor):
        """Use these class embeddings in every forward inside the block (e.g. one text pass shared by a whole attack
        and the training forward of a step)."""
        previous, self._pinned = self._pinned, text_features
        try:
            yield self
        finally:
            self._pinned = previous

    # ------------------------------------------------------------------------------------------------- image side
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"hpt: images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        if self.image_size is not None and tuple(images.shape[-2:]) != self.image_size:
            # bicubic, as the PMG-AFT / HPT-GPD code upsamples CIFAR and STL-10 (read at their own resolution)
            images = F.interpolate(images, size=self.image_size, mode="bicubic", align_corners=False)
        return (images - self.mean) / self.std

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) unit image embeddings of [0, 1] images."""
        with short_sequence_attention(images.device, self.image_tokens):
            return F.normalize(self.clip.encode_image(self.normalize(images)).float(), dim=-1)

    def logits_from(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        logits = image_features @ text_features.t()
        return logits * self.clip.logit_scale.exp() if self.mode == "clip" else logits

    def forward(self, images: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        if text_features is None:
            text_features = self._pinned if self._pinned is not None else self.text_features()
        return self.logits_from(self.image_features(images), text_features)

    def extra_repr(self) -> str:
        return f"classes={len(self.classnames)}, templates={len(self.templates)}, logits={self.mode!r}, " \
               f"cache_text={self.cache_text}"
