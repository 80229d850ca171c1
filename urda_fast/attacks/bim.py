"""BIM / I-FGSM."""

from .base import Attack


class BIM(Attack):
    r"""Basic Iterative Method (I-FGSM): iterated sign steps projected to the eps-ball, no random start.

    'Adversarial Examples in the Physical World', Kurakin et al., ICLR Workshops 2017 (https://arxiv.org/abs/1607.02533).
    The DART authors' code attacks students with it (eps 0.1, alpha 0.05, 10 steps, normalised space).

    Distance Measure : Linf

    Arguments:
        model: images -> logits. eps (float): budget (default 8/255). alpha (float): step (default 2/255).
        steps (int): iterations (default 10). Other keywords: see :class:`Attack`.

    Shape:
        images (B, C, H, W) in [0, 1] (or normalised with ``space="normalized"``); labels (B,). Output: like images.

    Examples::
        >>> attack = BIM(model, eps=0.1, alpha=0.05, steps=10, space="normalized", mean=mean, std=std)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, **kwargs):
        if "random_start" in kwargs:
            raise TypeError("urda_fast.attacks: BIM (I-FGSM) starts from the image itself: it takes no random_start; "
                            "use PGD for a random start")
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=False, **kwargs)
