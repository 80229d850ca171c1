"""Source-only training (ERM on the labelled source domain): the lower bound every UDA method is compared with."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import UDAMethod

__all__ = ["SourceOnly"]


class SourceOnly(UDAMethod):
    r"""Empirical risk minimisation on the source domain (tllib ``examples/.../erm.py``).

    .. math::
        \mathcal{L} = \mathbb{E}_{(x_i^s, y_i^s) \sim \mathcal{D}_s} \,\text{CE}(G(x_i^s), y_i^s)

    Only the source batch is forwarded, so BatchNorm statistics are the source domain's, as in tllib; the target
    batch is accepted (one signature for every method) and ignored.

    Args:
        model (ImageClassifier): the classifier.
        trade_off (float): accepted for a uniform interface; unused (there is no transfer loss).

    Inputs of ``training_step``:
        - x_s: source images :math:`(N, C, H, W)`; y_s: labels :math:`(N,)`; x_t: target images (ignored).

    Examples::

        >>> from urda_fast.models import DigitsCNN, ImageClassifier
        >>> method = SourceOnly(ImageClassifier(DigitsCNN(), 10, bottleneck_dim=32))
        >>> out = method.training_step(torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 2, 3]), torch.rand(4, 1, 16, 16))
        >>> out["loss"].backward()
    """

    name = "source-only"

    def training_step(self, x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.model(x_s)
        cls_loss = F.cross_entropy(logits, y_s)
        return self._metrics(cls_loss, cls_loss, cls_loss.new_zeros(()), logits, y_s)
