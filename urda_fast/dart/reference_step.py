"""The DART step written the way the authors' code writes it, in plain PyTorch: the eager twin that tests compare
our fused step with (same loss, same student gradients) and that `bench/bench_dart_step.py` times it against.

Separate clean and adversarial student forwards, an I-FGSM loop, ``F.kl_div`` on log-softmax / softmax and
``F.mse_loss``; nothing from ``urda_fast.ops``. Two structures:

- ``style="code"`` -- what DART/DART.py runs: the teacher's forward builds an autograd graph (it is called outside
  ``no_grad`` and its outputs enter the loss undetached, so the backward also runs through the teacher), and the
  attack is advertorch's ``LinfBasicIterativeAttack``, whose ``loss.backward()`` computes the student's parameter
  gradients at every step (the code's ``optimizer.zero_grad()`` after the attack drops them; so does this twin).
- ``style="lean"`` -- the same step as a careful hand-written eager loop: the teacher under ``no_grad`` and input
  gradients only (``torch.autograd.grad``), the textbook attack.

Both give the same loss and the same student gradients; the benchmark reports our step against each.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from urda_fast.attacks.reference import textbook_attack

STYLES = ("code", "lean")


def eager_kl(student_logits, teacher_logits, temperature, weight):
    """mean_i w_i KL(softmax(t_i/T) || softmax(s_i/T))."""
    rows = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.softmax(teacher_logits / temperature, dim=1),
                    reduction="none").sum(1)
    return (rows * weight).mean()


def eager_dart_loss(teacher, student, x, cfg, *, style: str = "code"):
    """The DART loss of one target batch ``x`` (pixel-space I-FGSM, per-sample weighting); returns the total."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    with torch.set_grad_enabled(style == "code"):
        teacher_logits, teacher_features = teacher(x, return_features=True)
    probs = F.softmax(teacher_logits, dim=1)
    weight = 1.0 - (-(probs * torch.log(probs + 1e-12)).sum(1)) / math.log(teacher_logits.shape[1])
    x_adv = textbook_attack(student, x, teacher_logits.detach().argmax(1), eps=cfg.attack_eps,
                            alpha=cfg.attack_alpha, steps=cfg.attack_steps,
                            gradient="backward" if style == "code" else "autograd")
    if style == "code":
        student.zero_grad(set_to_none=True)
    student.train()
    clean_logits, clean_features = student(x, return_features=True)
    adv_logits = student(x_adv)
    robust = eager_kl(adv_logits, teacher_logits, cfg.tau_robust, weight)
    transfer = eager_kl(clean_logits, teacher_logits, cfg.tau_transfer, weight)
    return cfg.kl_weight * (robust + transfer) + cfg.feature_weight * F.mse_loss(clean_features, teacher_features)
