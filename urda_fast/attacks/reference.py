"""The textbook attack loop in plain PyTorch: the independent reference our attacks are tested and benchmarked
against. Written the way torchattacks' PGD is (separate sign, add, clamp to the ball, clamp to the box)."""

import torch
import torch.nn.functional as F


def textbook_attack(model, images, labels, *, eps, alpha, steps, norm="linf", random_start=False, generator=None,
                    gradient="autograd"):
    """Untargeted CE attack on images in [0, 1]. Random start, when asked, draws from ``generator`` exactly as
    :class:`urda_fast.attacks.Attack` does, so the two can be compared sample by sample.

    ``gradient="autograd"`` takes the input gradient alone (``torch.autograd.grad``, as torchattacks does);
    ``"backward"`` calls ``loss.backward()`` and reads the input's ``.grad``, as advertorch's ``perturb_iterative``
    and the TeCoA / PMG-AFT / HPT code's ``attack_pgd`` do: the same examples, but every parameter that requires
    grad gets its gradient computed (and accumulated into ``.grad``) at every step -- the caller clears them."""
    if gradient not in ("autograd", "backward"):
        raise ValueError(f"gradient must be 'autograd' or 'backward', got {gradient!r}")
    was_training = model.training
    model.eval()
    images = images.detach()
    adv = images.clone()
    if random_start:
        if norm == "linf":
            noise = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype) * 2 - 1
            adv = torch.clamp(images + noise * eps, 0, 1)
        else:
            direction = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
            norms = direction.flatten(1).norm(dim=1).clamp_min(1e-12)
            radius = torch.rand(images.shape[0], generator=generator, device=images.device, dtype=images.dtype) * eps
            adv = torch.clamp(images + direction * (radius / norms).view(-1, *[1] * (images.dim() - 1)), 0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), labels, reduction="sum")
        if gradient == "autograd":
            (grad,) = torch.autograd.grad(loss, adv)
        else:
            loss.backward()
            grad = adv.grad
        with torch.no_grad():
            if norm == "linf":
                adv = adv + alpha * grad.sign()
                delta = torch.clamp(adv - images, -eps, eps)
            else:
                grad_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (images.dim() - 1))
                adv = adv + alpha * grad / grad_norm
                delta = adv - images
                delta_norm = delta.flatten(1).norm(dim=1).view(-1, *[1] * (images.dim() - 1))
                delta = delta * torch.clamp(eps / delta_norm.clamp_min(1e-12), max=1.0)
            adv = torch.clamp(images + delta, 0, 1).detach()
    model.train(was_training)
    return adv
