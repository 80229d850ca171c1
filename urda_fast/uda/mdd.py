"""MDD: margin disparity discrepancy with an adversarial classifier head (tllib ``alignment/mdd.py``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.classifier import mdd_head
from .base import UDAMethod
from .modules import WarmStartGradientReverseLayer

__all__ = ["MDD", "ClassificationMarginDisparityDiscrepancy", "mdd_head", "shift_log"]


def shift_log(x: torch.Tensor, offset: float = 1e-6) -> torch.Tensor:
    r""":math:`\log(\min(x + \text{offset}, 1))` (tllib): a log that stays finite at :math:`x = 0`.

    For :math:`x \in [0, 1]` the output lies in :math:`[\log(\text{offset}), 0]`."""
    return torch.log(torch.clamp(x + offset, max=1.0))


class ClassificationMarginDisparityDiscrepancy(nn.Module):
    r"""The margin disparity discrepancy of `Bridging Theory and Algorithm for Domain Adaptation (ICML 2019)
    <https://arxiv.org/abs/1904.05801>`_ (Zhang et al.), for classification, as tllib computes it.

    With main-head logits :math:`y`, adversarial-head logits :math:`y_{adv}`, :math:`h_y = \arg\max y` and margin
    :math:`\gamma`:

    .. math::
        \mathcal{D}_\gamma = \gamma\, \mathbb{E}_{\hat{\mathcal{S}}}
            \log \sigma(y^s_{adv})_{h_{y^s}}
            + \mathbb{E}_{\hat{\mathcal{T}}} \log\big(1 - \sigma(y^t_{adv})_{h_{y^t}}\big)

    (:math:`\sigma` the softmax; the target log is :func:`shift_log`), i.e.
    :math:`-\gamma\,\text{CE}(y^s_{adv}, h_{y^s}) + \text{shift\_log}(1 - \sigma(y^t_{adv}))[h_{y^t}]`. The adversarial
    head *maximises* it (agrees with the main head on source, disagrees on target); training therefore minimises
    ``transfer_loss = -D_gamma`` with a gradient reversal before the adversarial head, so the features minimise it.
    :math:`h_y` is an argmax: no gradient flows into the main head through it.

    Args:
        margin (float): :math:`\gamma`. Default: 4
        reduction (str): ``'mean'`` (the two domain means, summed) | ``'none'`` (per-sample source and target
            terms, summed; equal batch sizes only). Default: ``'mean'``

    Inputs:
        - y_s, y_s_adv: main and adversarial logits on source; y_t, y_t_adv: on target; w_s, w_t (optional):
          per-sample weights.

    Shape:
        - y_s, y_s_adv: :math:`(n_s, C)`; y_t, y_t_adv: :math:`(n_t, C)`. Output: scalar (or :math:`(n,)`).

    Examples::

        >>> loss_fn = ClassificationMarginDisparityDiscrepancy(margin=4.0)
        >>> y_s, y_t = torch.randn(8, 10), torch.randn(8, 10)
        >>> y_s_adv, y_t_adv = torch.randn(8, 10), torch.randn(8, 10)
        >>> mdd = loss_fn(y_s, y_s_adv, y_t, y_t_adv)
    """

    def __init__(self, margin: float = 4.0, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "none"):
            raise ValueError(f"mdd: reduction must be 'mean' or 'none', got {reduction!r}")
        self.margin = float(margin)
        self.reduction = reduction

    def forward(self, y_s: torch.Tensor, y_s_adv: torch.Tensor, y_t: torch.Tensor, y_t_adv: torch.Tensor,
                w_s: torch.Tensor | None = None, w_t: torch.Tensor | None = None) -> torch.Tensor:
        pred_s, pred_t = y_s.argmax(dim=1), y_t.argmax(dim=1)
        source = -self.margin * F.cross_entropy(y_s_adv.float(), pred_s, reduction="none")
        target = -F.nll_loss(shift_log(1.0 - F.softmax(y_t_adv.float(), dim=1)), pred_t, reduction="none")
        if w_s is not None:
            source = source * w_s
        if w_t is not None:
            target = target * w_t
        if self.reduction == "none":
            return source + target
        if source.shape == target.shape:
            return (source + target).mean()  # tllib's order of operations (bit-identical)
        return source.mean() + target.mean()  # unequal batch sizes: the two domain means

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class MDD(UDAMethod):
    r"""Margin Disparity Discrepancy (Zhang et al., ICML 2019), as tllib trains it.

    .. math::
        \mathcal{L} = \mathbb{E}_{\mathcal{D}_s} \text{CE}(G(x^s), y^s) - \lambda_{\text{trade-off}}\,
            \mathcal{D}_\gamma\big(y, \; y_{adv} = H_{adv}(\mathcal{R}(f))\big)

    One forward of ``cat(x_s, x_t)`` gives main logits :math:`y` and features :math:`f`; the adversarial head
    :math:`H_{adv}` (:func:`mdd_head`) sees :math:`f` through tllib's MDD reversal
    (``alpha=1, lo=0, hi=0.1, max_iters=1000``, one step per training step). ``transfer_loss`` is
    :math:`-\mathcal{D}_\gamma` (:class:`ClassificationMarginDisparityDiscrepancy`).

    Args:
        model (ImageClassifier): the classifier; tllib's for MDD is ``layout="mdd", bottleneck_dim=1024``.
        trade_off (float): Default: 1.0
        margin (float): :math:`\gamma`. Default: 4.0
        width (int): hidden width of the adversarial head. Default: the model's ``features_dim`` (tllib's script
            makes it the bottleneck width, 1024)
        dropout (float): dropout in the adversarial head. Default: 0.5
        grl_alpha, grl_lo, grl_hi, grl_max_iters: the reversal schedule. Defaults: 1.0, 0.0, 0.1, 1000 (tllib).

    ``training_step(x_s, y_s, x_t)`` returns ``loss, cls_loss, transfer_loss, cls_acc, mdd, grl_coeff``.

    Examples::

        >>> from urda_fast.models import DigitsCNN, ImageClassifier
        >>> method = MDD(ImageClassifier(DigitsCNN(), 10, bottleneck_dim=32), width=64)
        >>> x_s, y_s, x_t = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 2, 3]), torch.rand(4, 1, 16, 16)
        >>> method.training_step(x_s, y_s, x_t)["loss"].backward()
    """

    name = "mdd"

    def __init__(self, model, *, trade_off: float = 1.0, margin: float = 4.0, width: int | None = None,
                 dropout: float = 0.5, grl_alpha: float = 1.0, grl_lo: float = 0.0, grl_hi: float = 0.1,
                 grl_max_iters: float = 1000):
        super().__init__(model, trade_off=trade_off)
        self.adv_head = mdd_head(model.features_dim, model.num_classes, width or model.features_dim, dropout)
        self.grl = WarmStartGradientReverseLayer(alpha=grl_alpha, lo=grl_lo, hi=grl_hi, max_iters=grl_max_iters,
                                                 auto_step=True)
        self.mdd = ClassificationMarginDisparityDiscrepancy(margin)

    def training_step(self, x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, features = self.model(torch.cat((x_s, x_t), dim=0), return_features=True)
        grl_coeff = self.grl.coefficient()
        logits_adv = self.adv_head(self.grl(features))
        n = x_s.shape[0]
        cls_loss = F.cross_entropy(logits[:n], y_s)
        mdd = self.mdd(logits[:n], logits_adv[:n], logits[n:], logits_adv[n:])
        transfer_loss = -mdd  # the adversarial head minimises -MDD; the reversal makes the features minimise MDD
        loss = cls_loss + self.trade_off * transfer_loss
        return self._metrics(loss, cls_loss, transfer_loss, logits[:n], y_s, mdd=mdd, grl_coeff=grl_coeff.float())
