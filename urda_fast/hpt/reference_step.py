"""The HPT step written the way the reference code (HPT, built on PMG-AFT) writes it, in plain PyTorch: the eager
twin that tests compare ``HptTask.training_step`` with (same loss, same gradients) and that
``bench/bench_hpt_step.py`` times it against.

What the reference code does that ours does not: the class prompts go through the text tower in *every* forward
(each attack step, the target's training forward, and each frozen teacher's forward); the proxy and anchor forwards
are separate calls; the KL terms are ``nn.KLDivLoss(reduction="sum")`` on log-softmax / softmax. Nothing from
``urda_fast.ops``. Two structures of the attack:

- ``style="code"`` -- the code's ``attack_pgd``: ``loss.backward()`` on the perturbation, so every attack step also
  computes the parameter gradients of the target's trainable towers (and, with trainable text, through the prompts'
  encoding); the twin clears them after the attack. (The code calls ``optimizer.zero_grad()`` *before* the attack,
  so there they leak into the update, shrunk by the grad scaler's factor; the twin does not copy that.)
- ``style="lean"`` -- input gradients only (``torch.autograd.grad``), the textbook loop.

Both give the same loss and the same gradients; the benchmark reports our step against each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from urda_fast.attacks.reference import textbook_attack

from .zero_shot import PREPROCESS

STYLES = ("code", "lean")


class EagerZeroShot(nn.Module):
    """CLIP + prompts as a classifier of [0, 1] images, re-encoding the prompts at every call (as the code does)."""

    def __init__(self, clip, tokens: torch.Tensor, num_classes: int, logits: str = "cosine",
                 preprocess: str = "imagenet"):
        super().__init__()
        self.clip, self.tokens, self.num_classes, self.mode = clip, tokens, num_classes, logits
        mean, std = PREPROCESS[preprocess]
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, images):
        size = self.clip.visual.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
        image = F.normalize(self.clip.encode_image((images - self.mean) / self.std).float(), dim=-1)
        text = F.normalize(self.clip.encode_text(self.tokens).float(), dim=-1)
        text = F.normalize(text.reshape(self.num_classes, -1, text.shape[-1]).mean(1), dim=-1)
        logits = image @ text.t()
        return logits * self.clip.logit_scale.exp() if self.mode == "clip" else logits


def eager_hpt_loss(target: EagerZeroShot, proxy: EagerZeroShot, anchor: EagerZeroShot, x, y, cfg,
                   proxy_weight: float, anchor_weight: float, *, style: str = "code") -> torch.Tensor:
    """The HPT loss of one batch: PGD (CE, no random start) on the target, then
    w_p KL(proxy(x_adv) || target(x_adv)) + w_a KL(anchor(x) || target(x_adv)), KL summed over the batch."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    x_adv = textbook_attack(target, x, y, eps=cfg.attack_eps, alpha=cfg.attack_alpha, steps=cfg.attack_steps,
                            gradient="backward" if style == "code" else "autograd")
    if style == "code":
        target.zero_grad(set_to_none=True)
    target.train()
    log_probs = F.log_softmax(target(x_adv), dim=1)
    kl = nn.KLDivLoss(reduction="sum")
    total = log_probs.new_zeros(())
    with torch.no_grad():
        proxy_probs = F.softmax(proxy(x_adv), dim=1) if proxy_weight else None
        anchor_probs = F.softmax(anchor(x), dim=1) if anchor_weight else None
    if proxy_weight:
        total = total + proxy_weight * kl(log_probs, proxy_probs)
    if anchor_weight:
        total = total + anchor_weight * kl(log_probs, anchor_probs)
    return total
