"""Building blocks the adversarial UDA methods share: gradient reversal, the domain discriminator, entropy and a
binary accuracy. They follow tllib's ``tllib/modules/{grl,domain_discriminator,entropy}.py``, with the training state
(the gradient-reversal schedule's iteration counter) in a registered buffer so ``state_dict()`` captures it."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DomainDiscriminator", "GradientReverseFunction", "GradientReverseLayer",
           "WarmStartGradientReverseLayer", "binary_accuracy", "entropy", "probability_bce", "warm_start_coefficient"]


class GradientReverseFunction(torch.autograd.Function):
    r"""Identity forward, :math:`-\lambda \cdot` gradient backward (Ganin & Lempitsky, ICML 2015).

    ``coeff`` is a float or a 0-dim tensor; a tensor keeps a scheduled :math:`\lambda` on the device (no host sync).
    """

    @staticmethod
    def forward(ctx, input: torch.Tensor, coeff=1.0) -> torch.Tensor:
        ctx.coeff = coeff
        return input * 1.0  # a new tensor, as tllib: the output must not alias the input

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        coeff = ctx.coeff
        if torch.is_tensor(coeff):
            # Round lambda to the gradient's dtype first, as a Python float would be (bit-identical to tllib).
            coeff = coeff.to(grad_output.dtype)
        return grad_output.neg() * coeff, None


class GradientReverseLayer(nn.Module):
    r"""Gradient reversal with a fixed coefficient: :math:`\mathcal{R}(x) = x`, :math:`d\mathcal{R}/dx = -\lambda I`.

    Args:
        coeff (float): :math:`\lambda`. Default: 1.0

    Shape:
        - Input: any; Output: same shape.
    """

    def __init__(self, coeff: float = 1.0):
        super().__init__()
        self.coeff = float(coeff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return GradientReverseFunction.apply(x, self.coeff)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}"


def warm_start_coefficient(iteration, alpha: float = 1.0, lo: float = 0.0, hi: float = 1.0,
                           max_iters: float = 1000.0):
    r""":math:`\lambda_i = \dfrac{2(hi-lo)}{1+\exp(-\alpha\, i/N)} - (hi-lo) + lo` in float64 (tllib's numpy formula).

    ``iteration`` is an integer tensor (result: float64 tensor on its device) or a Python number (result: float)."""
    if torch.is_tensor(iteration):
        e = torch.exp(-alpha * iteration.double() / max_iters)
    else:
        e = math.exp(-alpha * iteration / max_iters)
    return 2.0 * (hi - lo) / (1.0 + e) - (hi - lo) + lo


class WarmStartGradientReverseLayer(nn.Module):
    r"""Gradient reversal whose coefficient rises from ``lo`` to ``hi`` (tllib ``WarmStartGradientReverseLayer``).

    .. math::
        \mathcal{R}(x) = x, \qquad \dfrac{d\mathcal{R}}{dx} = -\lambda_i I, \qquad
        \lambda_i = \dfrac{2(hi-lo)}{1+\exp(-\alpha\, i / N)} - (hi-lo) + lo,

    where :math:`i` is the iteration counter. ``forward`` uses the current :math:`i`, then (with ``auto_step``)
    increments it, as tllib does. The counter is the registered buffer ``iter_num`` (int64), so it is saved and
    restored with ``state_dict()``; it steps on every forward call, in train and eval mode alike (as tllib).

    With :math:`\alpha = 10` and :math:`N` the total number of iterations this is DANN's schedule
    :math:`2/(1+e^{-10p}) - 1`; tllib's default (:math:`\alpha = 1`, :math:`N = 1000`) equals it for a 10,000-iteration
    run, and is the CDAN authors' code setting (alpha 10, max_iter 10000).

    Args:
        alpha (float): :math:`\alpha`. Default: 1.0
        lo (float): :math:`\lambda_0`. Default: 0.0
        hi (float): the limit of :math:`\lambda`. Default: 1.0
        max_iters (float): :math:`N`. Default: 1000
        auto_step (bool): increment :math:`i` on every forward. Default: True (tllib's default is False, but DANN and
            CDAN construct it with True, and MDD calls ``step()`` after every forward, which is the same)

    Shape:
        - Input: any; Output: same shape.

    Examples::

        >>> grl = WarmStartGradientReverseLayer(alpha=1.0, lo=0.0, hi=1.0, max_iters=1000)
        >>> f = torch.randn(4, 8, requires_grad=True)
        >>> out = grl(f)          # lambda_0 = 0; the counter is now 1
        >>> float(grl.coefficient())
        0.0004999999583...
    """

    def __init__(self, alpha: float = 1.0, lo: float = 0.0, hi: float = 1.0, max_iters: float = 1000.0,
                 auto_step: bool = True):
        super().__init__()
        self.alpha, self.lo, self.hi, self.max_iters = float(alpha), float(lo), float(hi), float(max_iters)
        self.auto_step = auto_step
        self.register_buffer("iter_num", torch.zeros((), dtype=torch.long))

    def coefficient(self) -> torch.Tensor:
        """:math:`\\lambda_i` for the current counter: a float64 0-dim tensor on the counter's device."""
        return warm_start_coefficient(self.iter_num, self.alpha, self.lo, self.hi, self.max_iters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coeff = self.coefficient()
        if self.auto_step:
            self.step()
        return GradientReverseFunction.apply(x, coeff)

    @torch.no_grad()
    def step(self) -> None:
        """Increase :math:`i` by 1 (in place, on the buffer's device)."""
        self.iter_num.add_(1)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, lo={self.lo}, hi={self.hi}, max_iters={self.max_iters}, auto_step={self.auto_step}"


class DomainDiscriminator(nn.Sequential):
    r"""Predicts :math:`P(\text{source} \mid f)`: Linear-BN-ReLU, Linear-BN-ReLU, Linear(1)-Sigmoid (tllib).

    From `Domain-Adversarial Training of Neural Networks (JMLR 2016) <https://arxiv.org/abs/1505.07818>`_. Source
    is label 1, target label 0.

    Args:
        in_feature (int): input dimension.
        hidden_size (int): hidden width. Default: 1024
        batch_norm (bool): BatchNorm1d after each hidden Linear; if False, ReLU then Dropout(0.5) (tllib's variant).
            Default: True

    Shape:
        - Input: :math:`(N, \text{in\_feature})`; Output: :math:`(N, 1)`, probabilities in (0, 1).

    Examples::

        >>> discriminator = DomainDiscriminator(in_feature=256, hidden_size=1024)
        >>> discriminator(torch.randn(8, 256)).shape
        torch.Size([8, 1])
    """

    def __init__(self, in_feature: int, hidden_size: int = 1024, batch_norm: bool = True):
        if batch_norm:
            hidden = [nn.Linear(in_feature, hidden_size), nn.BatchNorm1d(hidden_size), nn.ReLU(),
                      nn.Linear(hidden_size, hidden_size), nn.BatchNorm1d(hidden_size), nn.ReLU()]
        else:
            hidden = [nn.Linear(in_feature, hidden_size), nn.ReLU(), nn.Dropout(0.5),
                      nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Dropout(0.5)]
        super().__init__(*hidden, nn.Sequential(nn.Linear(hidden_size, 1), nn.Sigmoid()))


def entropy(probs: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    r"""Per-sample entropy :math:`H(p) = -\sum_c p_c \log(p_c + \epsilon)` (tllib's :math:`\epsilon = 10^{-5}`).

    Shape:
        - probs: :math:`(N, C)` probabilities; Output: :math:`(N,)`.
    """
    return -(probs * torch.log(probs + eps)).sum(dim=1)


def probability_bce(probs: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``F.binary_cross_entropy(probs, targets, weight)`` (tllib's domain loss, its values and gradients) whose value
    is NaN, instead of the kernel's range error, when a diverged discriminator gives NaN probabilities: the training
    loop then names the iteration (and on CUDA the kernel's device assert would end the process)."""
    loss = F.binary_cross_entropy(probs.nan_to_num(0.5), targets, weight=weight)
    return loss + 0.0 * probs.sum()  # + 0 exactly, and its gradient 0, while the probabilities are finite


@torch.no_grad()
def binary_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Percentage of ``probs >= 0.5`` that match the 0/1 ``labels`` (tllib ``binary_accuracy``), detached.

    Shape:
        - probs, labels: :math:`(N, 1)` or :math:`(N,)`; Output: scalar in [0, 100].
    """
    correct = ((probs.reshape(-1) >= 0.5).float() == labels.reshape(-1).float()).float().sum()
    return correct * (100.0 / labels.numel())  # tllib's rounding: sum * (100 / N)
