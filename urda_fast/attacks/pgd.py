"""PGD (L-inf)."""

from .base import Attack


class PGD(Attack):
    r"""Projected Gradient Descent under an L-inf budget, with random start and batched restarts.

    'Towards Deep Learning Models Resistant to Adversarial Attacks', Madry et al., ICLR 2018
    (https://arxiv.org/abs/1706.06083).

    Distance Measure : Linf

    Arguments:
        model: images -> logits. eps (float): budget (default 8/255). alpha (float): step (default 2/255).
        steps (int): iterations (default 10). random_start (bool): default True. restarts (int): default 1.
        Other keywords (loss, space, early_stop, max_batch, seed, ...): see :class:`Attack`.

    Shape:
        images (B, C, H, W) in [0, 1] (or normalised with ``space="normalized"``); labels (B,). Output: like images.

    Examples::
        >>> attack = PGD(model, eps=8/255, alpha=2/255, steps=10, random_start=True, restarts=1, loss="ce")
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True, **kwargs):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, **kwargs)
