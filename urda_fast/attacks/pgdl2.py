"""PGD (L2)."""

from .base import Attack


class PGDL2(Attack):
    r"""Projected Gradient Descent under an L2 budget: normalised-gradient steps, per-sample projection.

    'Towards Deep Learning Models Resistant to Adversarial Attacks', Madry et al., ICLR 2018
    (https://arxiv.org/abs/1706.06083).

    Distance Measure : L2

    Arguments:
        model: images -> logits. eps (float): budget (default 0.5). alpha (float): step (default 0.1).
        steps (int): iterations (default 10). random_start (bool): default True (a random point of the ball).
        Other keywords: see :class:`Attack`.

    Shape:
        images (B, C, H, W) in [0, 1] (or normalised with ``space="normalized"``); labels (B,). Output: like images.

    Examples::
        >>> attack = PGDL2(model, eps=0.5, alpha=0.1, steps=10)
        >>> adv_images = attack(images, labels)
    """

    norm = "l2"

    def __init__(self, model, eps=0.5, alpha=0.1, steps=10, random_start=True, **kwargs):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, **kwargs)
