"""CDAN: a domain discriminator conditioned on the classifier's predictions (tllib ``alignment/cdan.py``)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from urda_fast import distributed

from .base import UDAMethod
from .modules import DomainDiscriminator, WarmStartGradientReverseLayer, binary_accuracy, entropy, probability_bce

__all__ = ["CDAN", "ConditionalDomainAdversarialLoss", "MultiLinearMap", "RandomizedMultiLinearMap",
           "entropy_weights"]


class MultiLinearMap(nn.Module):
    r"""The multilinear map :math:`T_\otimes(f, g) = g \otimes f`, flattened: output index :math:`c \cdot F + j` holds
    :math:`g_c f_j`.

    Shape:
        - f: :math:`(N, F)`, g: :math:`(N, C)`; Output: :math:`(N, C \cdot F)`.
    """

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.bmm(g.unsqueeze(2), f.unsqueeze(1)).reshape(f.shape[0], -1)


class RandomizedMultiLinearMap(nn.Module):
    r"""The randomized multilinear map :math:`T_\odot(f, g) = \tfrac{1}{\sqrt d} (f R_f) \odot (g R_g)`.

    :math:`R_f, R_g` are standard normal, drawn once (from the global generator) and fixed. Unlike tllib, which keeps
    them as plain attributes, they are persistent buffers: a checkpoint restores the same map.

    Args:
        features_dim (int): :math:`F`. num_classes (int): :math:`C`. output_dim (int): :math:`d`. Default: 1024

    Shape:
        - f: :math:`(N, F)`, g: :math:`(N, C)`; Output: :math:`(N, d)`.
    """

    def __init__(self, features_dim: int, num_classes: int, output_dim: int = 1024):
        super().__init__()
        self.register_buffer("Rf", torch.randn(features_dim, output_dim))
        self.register_buffer("Rg", torch.randn(num_classes, output_dim))
        self.output_dim = output_dim

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.mm(f, self.Rf.to(f.dtype)) * torch.mm(g, self.Rg.to(g.dtype)) / math.sqrt(float(self.output_dim))


def entropy_weights(probs: torch.Tensor) -> torch.Tensor:
    r"""CDAN+E's per-sample weights :math:`w_i = 1 + e^{-H(p_i)}`, rescaled to sum to :math:`N` over the whole
    (source + target) batch, as tllib does. Under DDP the batch is the global one, every rank's (one all-reduce, so
    every rank must call it), and W processes of batch B weigh their samples as one process of W * B. The weights
    carry no gradient to the normaliser there: CDAN detaches the predictions it weighs by.

    Shape:
        - probs: :math:`(N, C)`; Output: :math:`(N,)`.
    """
    w = 1.0 + torch.exp(-entropy(probs))
    total, count = distributed.all_reduce_sum(torch.stack([w.sum(), w.new_tensor(float(probs.shape[0]))])).unbind()
    return w / total * count


class ConditionalDomainAdversarialLoss(nn.Module):
    r"""The conditional domain adversarial loss of `Conditional Adversarial Domain Adaptation (NeurIPS 2018)
    <https://arxiv.org/abs/1705.10667>`_ (Long et al.).

    With discriminator :math:`D`, reversal :math:`\mathcal{R}`, features :math:`f`, softmax predictions :math:`g`
    (detached) and a map :math:`T` (:class:`MultiLinearMap` or :class:`RandomizedMultiLinearMap`):

    .. math::
        \mathcal{L}_{adv} = -\mathbb{E}_{x^s \sim \mathcal{D}_s} w^s \log D(\mathcal{R}(T(f^s, g^s)))
            - \mathbb{E}_{x^t \sim \mathcal{D}_t} w^t \log\big[1 - D(\mathcal{R}(T(f^t, g^t)))\big],

    the mean over the concatenated batch, with :math:`w = 1` or, with entropy conditioning (CDAN+E),
    :func:`entropy_weights`.

    Args:
        domain_discriminator (nn.Module): :math:`(N, \dim T) \to (N, 1)` probabilities of "source".
        entropy_conditioning (bool): CDAN+E. Default: False
        randomized (bool): use the randomized map (needs ``num_classes`` and ``features_dim``). Default: False
        num_classes, features_dim (int): for the randomized map. randomized_dim (int): its output width. Default: 1024
        grl (nn.Module, optional): Default: ``WarmStartGradientReverseLayer(alpha=1, lo=0, hi=1, max_iters=1000,
            auto_step=True)`` (tllib).

    Inputs:
        - g_s, g_t: classifier logits; f_s, f_t: features.

    Returns:
        ``(loss, domain_acc)``: the scalar loss and the discriminator's accuracy over the whole batch, in percent.

    Shape:
        - g_s: :math:`(n_s, C)`, f_s: :math:`(n_s, F)`, g_t: :math:`(n_t, C)`, f_t: :math:`(n_t, F)`.

    Examples::

        >>> discriminator = DomainDiscriminator(in_feature=256 * 10, hidden_size=1024)
        >>> loss_fn = ConditionalDomainAdversarialLoss(discriminator, entropy_conditioning=True)
        >>> f_s, f_t = torch.randn(8, 256), torch.randn(8, 256)
        >>> g_s, g_t = torch.randn(8, 10), torch.randn(8, 10)
        >>> loss, domain_acc = loss_fn(g_s, f_s, g_t, f_t)
    """

    def __init__(self, domain_discriminator: nn.Module, entropy_conditioning: bool = False, randomized: bool = False,
                 num_classes: int = -1, features_dim: int = -1, randomized_dim: int = 1024,
                 grl: nn.Module | None = None):
        super().__init__()
        self.domain_discriminator = domain_discriminator
        self.grl = grl if grl is not None else WarmStartGradientReverseLayer(alpha=1.0, lo=0.0, hi=1.0,
                                                                             max_iters=1000, auto_step=True)
        self.entropy_conditioning = entropy_conditioning
        if randomized:
            if num_classes <= 0 or features_dim <= 0 or randomized_dim <= 0:
                raise ValueError("cdan: the randomized map needs num_classes, features_dim and randomized_dim > 0")
            self.map = RandomizedMultiLinearMap(features_dim, num_classes, randomized_dim)
        else:
            self.map = MultiLinearMap()

    def forward(self, g_s: torch.Tensor, f_s: torch.Tensor, g_t: torch.Tensor, f_t: torch.Tensor):
        f = torch.cat((f_s, f_t), dim=0)
        g = F.softmax(torch.cat((g_s, g_t), dim=0), dim=1).detach()
        d = self.domain_discriminator(self.grl(self.map(f, g)))
        labels = torch.cat((d.new_ones(g_s.shape[0], 1), d.new_zeros(g_t.shape[0], 1)))
        domain_acc = binary_accuracy(d, labels)
        # float32 with autocast off: binary_cross_entropy is refused under CUDA autocast.
        with torch.autocast(d.device.type, enabled=False):
            weight = entropy_weights(g.float()).view(-1, 1) if self.entropy_conditioning else None
            loss = probability_bce(d.float(), labels.float(), weight=weight)
        return loss, domain_acc


class CDAN(UDAMethod):
    r"""Conditional Domain Adversarial Network (Long et al., NeurIPS 2018), as tllib trains it.

    .. math::
        \mathcal{L} = \mathbb{E}_{\mathcal{D}_s} \text{CE}(G(x^s), y^s) + \lambda_{\text{trade-off}}\,\mathcal{L}_{adv}

    with :math:`\mathcal{L}_{adv}` the :class:`ConditionalDomainAdversarialLoss` on (logits, bottleneck features) of
    one forward of ``cat(x_s, x_t)``. The discriminator (hidden 1024, BatchNorm) takes ``features_dim * num_classes``
    inputs, or ``randomized_dim`` with the randomized map (the paper uses it when that product exceeds 4096; tllib
    and this class default to the exact map).

    Args:
        model (ImageClassifier): the classifier (``model.features_dim``, ``model.num_classes``).
        trade_off (float): Default: 1.0
        entropy_conditioning (bool): CDAN+E. Default: False
        randomized (bool): randomized multilinear map. Default: False
        randomized_dim (int): Default: 1024
        hidden_size (int): discriminator width. Default: 1024
        grl_alpha, grl_lo, grl_hi, grl_max_iters: the reversal schedule. Defaults: 1.0, 0.0, 1.0, 1000 (tllib).

    ``training_step(x_s, y_s, x_t)`` returns ``loss, cls_loss, transfer_loss, cls_acc, domain_acc, grl_coeff``.

    Examples::

        >>> from urda_fast.models import DigitsCNN, ImageClassifier
        >>> method = CDAN(ImageClassifier(DigitsCNN(), 10, bottleneck_dim=32), entropy_conditioning=True)
        >>> x_s, y_s, x_t = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 2, 3]), torch.rand(4, 1, 16, 16)
        >>> method.training_step(x_s, y_s, x_t)["loss"].backward()
    """

    name = "cdan"

    def __init__(self, model, *, trade_off: float = 1.0, entropy_conditioning: bool = False, randomized: bool = False,
                 randomized_dim: int = 1024, hidden_size: int = 1024, grl_alpha: float = 1.0, grl_lo: float = 0.0,
                 grl_hi: float = 1.0, grl_max_iters: float = 1000):
        super().__init__(model, trade_off=trade_off)
        in_feature = randomized_dim if randomized else model.features_dim * model.num_classes
        grl = WarmStartGradientReverseLayer(alpha=grl_alpha, lo=grl_lo, hi=grl_hi, max_iters=grl_max_iters,
                                            auto_step=True)
        self.domain_adv = ConditionalDomainAdversarialLoss(
            DomainDiscriminator(in_feature, hidden_size), entropy_conditioning=entropy_conditioning,
            randomized=randomized, num_classes=model.num_classes, features_dim=model.features_dim,
            randomized_dim=randomized_dim, grl=grl)

    def training_step(self, x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor) -> dict[str, torch.Tensor]:
        y_s_logits, y_t_logits, f_s, f_t = self.forward_domains(x_s, x_t)
        cls_loss = F.cross_entropy(y_s_logits, y_s)
        grl_coeff = self.domain_adv.grl.coefficient()
        transfer_loss, domain_acc = self.domain_adv(y_s_logits, f_s, y_t_logits, f_t)
        loss = cls_loss + self.trade_off * transfer_loss
        return self._metrics(loss, cls_loss, transfer_loss, y_s_logits, y_s, domain_acc=domain_acc,
                             grl_coeff=grl_coeff.float())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, entropy_conditioning={self.domain_adv.entropy_conditioning}"
