"""FGSM."""

from .base import Attack


class FGSM(Attack):
    r"""Fast Gradient Sign Method: one step of size eps.

    'Explaining and Harnessing Adversarial Examples', Goodfellow et al., ICLR 2015 (https://arxiv.org/abs/1412.6572).

    Distance Measure : Linf

    Arguments:
        model: images -> logits. eps (float): budget (default 8/255). Other keywords: see :class:`Attack`.

    Shape:
        images (B, C, H, W) in [0, 1] (or normalised with ``space="normalized"``); labels (B,). Output: like images.

    Examples::
        >>> attack = FGSM(model, eps=8/255)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model, eps=8 / 255, **kwargs):
        for fixed in ("alpha", "steps", "random_start"):
            if fixed in kwargs:
                raise TypeError(f"urda_fast.attacks: FGSM is one step of size eps from the image itself: it takes no "
                                f"{fixed}; use BIM (several steps) or PGD (random start)")
        super().__init__(model, eps=eps, alpha=eps, steps=1, random_start=False, **kwargs)
