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
        super().__init__(model, eps=eps, alpha=eps, steps=1, random_start=False, **kwargs)
