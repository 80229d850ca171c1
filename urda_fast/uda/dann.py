"""DANN: a domain discriminator trained through a gradient reversal layer (tllib ``alignment/dann.py``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import UDAMethod
from .modules import DomainDiscriminator, WarmStartGradientReverseLayer, binary_accuracy, probability_bce

__all__ = ["DANN", "DomainAdversarialLoss", "domain_bce"]


def domain_bce(d_s: torch.Tensor, d_t: torch.Tensor, w_s: torch.Tensor | None = None,
               w_t: torch.Tensor | None = None) -> torch.Tensor:
    r"""tllib's domain loss on discriminator probabilities: source label 1, target label 0, the two means averaged.

    .. math::
        \tfrac12 \Big(-\tfrac{1}{n_s}\sum_i w^s_i \log d^s_i \;-\; \tfrac{1}{n_t}\sum_j w^t_j \log(1 - d^t_j)\Big)

    Computed in float32 with autocast off: ``binary_cross_entropy`` is refused under CUDA autocast, and half precision
    would lose the log near 0 and 1.

    Shape:
        - d_s: :math:`(n_s, 1)`, d_t: :math:`(n_t, 1)` probabilities; w_s, w_t: :math:`(n_s,)`, :math:`(n_t,)` or
          None (weight 1). Output: scalar.
    """
    with torch.autocast(d_s.device.type, enabled=False):
        d_s, d_t = d_s.float(), d_t.float()
        w_s = None if w_s is None else w_s.float().view_as(d_s)
        w_t = None if w_t is None else w_t.float().view_as(d_t)
        loss_s = probability_bce(d_s, torch.ones_like(d_s), weight=w_s)
        loss_t = probability_bce(d_t, torch.zeros_like(d_t), weight=w_t)
        return 0.5 * (loss_s + loss_t)


class DomainAdversarialLoss(nn.Module):
    r"""The domain adversarial loss of `Domain-Adversarial Training of Neural Networks (JMLR 2016)
    <https://arxiv.org/abs/1505.07818>`_ (Ganin et al.; first as Ganin & Lempitsky, ICML 2015).

    With domain discriminator :math:`D` and gradient reversal :math:`\mathcal{R}` on the features :math:`f`:

    .. math::
        \mathcal{L}_{adv} = -\tfrac12 \Big(\mathbb{E}_{x^s \sim \mathcal{D}_s} \log D(\mathcal{R}(f^s))
            + \mathbb{E}_{x^t \sim \mathcal{D}_t} \log\big[1 - D(\mathcal{R}(f^t))\big]\Big).

    :math:`D` minimises it; through :math:`\mathcal{R}` the feature extractor maximises it. The :math:`\tfrac12` is
    tllib's (the paper sums the two domain terms).

    Args:
        domain_discriminator (nn.Module): :math:`(N, F) \to (N, 1)` probabilities of "source".
        grl (nn.Module, optional): the gradient reversal. Default: tllib's
            ``WarmStartGradientReverseLayer(alpha=1, lo=0, hi=1, max_iters=1000, auto_step=True)``.

    Inputs:
        - f_s, f_t: source and target features; w_s, w_t (optional): per-sample weights.

    Returns:
        ``(loss, domain_acc)``: the scalar loss and the discriminator's accuracy in percent (detached), the mean of
        its source and target accuracies.

    Shape:
        - f_s: :math:`(n_s, F)`, f_t: :math:`(n_t, F)`; w_s: :math:`(n_s,)`, w_t: :math:`(n_t,)`.

    Examples::

        >>> loss_fn = DomainAdversarialLoss(DomainDiscriminator(in_feature=256, hidden_size=1024))
        >>> f_s, f_t = torch.randn(8, 256, requires_grad=True), torch.randn(8, 256, requires_grad=True)
        >>> loss, domain_acc = loss_fn(f_s, f_t)
        >>> loss.backward()
    """

    def __init__(self, domain_discriminator: nn.Module, grl: nn.Module | None = None):
        super().__init__()
        self.grl = grl if grl is not None else WarmStartGradientReverseLayer(alpha=1.0, lo=0.0, hi=1.0,
                                                                             max_iters=1000, auto_step=True)
        self.domain_discriminator = domain_discriminator

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, w_s: torch.Tensor | None = None,
                w_t: torch.Tensor | None = None):
        d = self.domain_discriminator(self.grl(torch.cat((f_s, f_t), dim=0)))
        d_s, d_t = d[:f_s.shape[0]], d[f_s.shape[0]:]
        domain_acc = 0.5 * (binary_accuracy(d_s, torch.ones_like(d_s)) + binary_accuracy(d_t, torch.zeros_like(d_t)))
        return domain_bce(d_s, d_t, w_s, w_t), domain_acc


class DANN(UDAMethod):
    r"""Domain-Adversarial Neural Network (Ganin et al., JMLR 2016), as tllib trains it.

    .. math::
        \mathcal{L} = \mathbb{E}_{\mathcal{D}_s} \text{CE}(G(x^s), y^s) + \lambda_{\text{trade-off}}\,\mathcal{L}_{adv}

    with :math:`\mathcal{L}_{adv}` the :class:`DomainAdversarialLoss` on the bottleneck features of one forward of
    ``cat(x_s, x_t)``, a :class:`DomainDiscriminator` (hidden 1024, BatchNorm) and tllib's warm-start reversal.

    Args:
        model (ImageClassifier): the classifier (features of width ``model.features_dim``).
        trade_off (float): :math:`\lambda_{\text{trade-off}}`. Default: 1.0
        hidden_size (int): discriminator width. Default: 1024
        grl_alpha, grl_lo, grl_hi, grl_max_iters: the reversal schedule. Defaults: 1.0, 0.0, 1.0, 1000 (tllib; the
            paper's :math:`2/(1+e^{-10p})-1` over ``T`` iterations is ``grl_alpha=10, grl_max_iters=T``).

    ``training_step(x_s, y_s, x_t)`` returns ``loss, cls_loss, transfer_loss, cls_acc, domain_acc, grl_coeff``.

    Examples::

        >>> from urda_fast.models import DigitsCNN, ImageClassifier
        >>> method = DANN(ImageClassifier(DigitsCNN(), 10, bottleneck_dim=32))
        >>> x_s, y_s, x_t = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 2, 3]), torch.rand(4, 1, 16, 16)
        >>> method.training_step(x_s, y_s, x_t)["loss"].backward()
    """

    name = "dann"

    def __init__(self, model, *, trade_off: float = 1.0, hidden_size: int = 1024, grl_alpha: float = 1.0,
                 grl_lo: float = 0.0, grl_hi: float = 1.0, grl_max_iters: float = 1000):
        super().__init__(model, trade_off=trade_off)
        grl = WarmStartGradientReverseLayer(alpha=grl_alpha, lo=grl_lo, hi=grl_hi, max_iters=grl_max_iters,
                                            auto_step=True)
        self.domain_adv = DomainAdversarialLoss(DomainDiscriminator(model.features_dim, hidden_size), grl)

    def training_step(self, x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor) -> dict[str, torch.Tensor]:
        y_s_logits, _, f_s, f_t = self.forward_domains(x_s, x_t)
        cls_loss = F.cross_entropy(y_s_logits, y_s)
        grl_coeff = self.domain_adv.grl.coefficient()  # the lambda this step uses (read before the counter steps)
        transfer_loss, domain_acc = self.domain_adv(f_s, f_t)
        loss = cls_loss + self.trade_off * transfer_loss
        return self._metrics(loss, cls_loss, transfer_loss, y_s_logits, y_s, domain_acc=domain_acc,
                             grl_coeff=grl_coeff.float())
