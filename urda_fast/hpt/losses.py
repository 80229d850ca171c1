r"""The robust fine-tuning losses of HPT-GPD and its baselines (shared methods.md §2), all KL terms through
:func:`urda_fast.ops.kd_kl_loss`.

With :math:`s_m(\cdot)` the zero-shot logits of model m, :math:`x^{adv}` PGD on the target, and
:math:`KL(p\|q)=\sum_c p_c(\log p_c-\log q_c)` of softmaxes (summed over the batch by default, as the code's
``KLDivLoss(reduction="sum")``):

.. math::
    L_{TeCoA} = CE(s_{tgt}(x^{adv}), y)

    L_{PMG-AFT} = CE(s_{tgt}(x^{adv}), y) + \alpha\,KL(s_{orig}(x^{adv}) \| s_{tgt}(x^{adv}))
                  + \beta\,KL(s_{tgt}(x) \| s_{tgt}(x^{adv}))

    L_{HPT} = w_p\,KL(s_{proxy}(x^{adv}) \| s_{tgt}(x^{adv})) + w_a\,KL(s_{anchor}(x) \| s_{tgt}(x^{adv}))

HPT's code uses :math:`w_p = 1, w_a = 0.001`; GPD's warm-up changes the weights (see :mod:`.schedule`).

PMG-AFT's code computes its two KL terms the other way round, ``KLDivLoss(log_softmax(s_orig(x_adv)),
softmax(s_tgt(x_adv)))``, i.e. :math:`KL(s_{tgt}(x^{adv}) \| s_{orig}(x^{adv}))` and
:math:`KL(s_{tgt}(x^{adv}) \| s_{tgt}(x))`: ``pmg_aft_loss(..., direction="code")``. With the code's cosine logits
(no scale) the two directions give nearly the same gradient; with CLIP's x100 logits they differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from urda_fast import ops

REDUCTIONS = ("sum", "batchmean")
PMG_DIRECTIONS = ("paper", "code")


def _check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"hpt: kl_reduction must be one of {REDUCTIONS}, got {reduction!r}")


def tecoa_loss(target_adv_logits: torch.Tensor, labels: torch.Tensor):
    """TeCoA: cross-entropy of the target on adversarial images. Returns (total, {"ce_loss"})."""
    ce = F.cross_entropy(target_adv_logits.float(), labels)
    return ce, {"ce_loss": ce.detach()}


def anchor_loss(target_logits: torch.Tensor, anchor_clean_logits: torch.Tensor, reduction: str = "sum"):
    """KL(s_anchor(x) || s_target(.)): the pull towards the frozen anchor's clean predictions."""
    _check_reduction(reduction)
    return ops.kd_kl_loss(target_logits, anchor_clean_logits, reduction=reduction)


def pmg_aft_loss(target_adv_logits, labels, original_adv_logits, target_clean_logits, *, original_weight=1.0,
                 clean_weight=1.0, reduction="sum", direction="paper"):
    """PMG-AFT. ``original_adv_logits`` come from the frozen pre-trained model; both target sides are trained.
    ``direction``: ``"paper"``, the KL terms as above (methods.md), or ``"code"``, as the PMG-AFT code computes them
    (the target's adversarial prediction first; see the module's notes).

    Shapes: logits (B, C), labels (B,). Returns (total, {"ce_loss", "original_loss", "clean_loss"}).
    """
    _check_reduction(reduction)
    if direction not in PMG_DIRECTIONS:
        raise ValueError(f"hpt: pmg_kl_direction must be one of {PMG_DIRECTIONS}, got {direction!r}")
    ce = F.cross_entropy(target_adv_logits.float(), labels)
    if direction == "paper":  # kd_kl_loss(q, p) is KL(p || q)
        original = ops.kd_kl_loss(target_adv_logits, original_adv_logits, reduction=reduction)
        clean = ops.kd_kl_loss(target_adv_logits, target_clean_logits, reduction=reduction)
    else:
        original = ops.kd_kl_loss(original_adv_logits, target_adv_logits, reduction=reduction)
        clean = ops.kd_kl_loss(target_clean_logits, target_adv_logits, reduction=reduction)
    total = ce + original_weight * original + clean_weight * clean
    return total, {"ce_loss": ce.detach(), "original_loss": original.detach(), "clean_loss": clean.detach()}


def hpt_loss(target_adv_logits, proxy_adv_logits, anchor_clean_logits, *, proxy_weight=1.0, anchor_weight=0.001,
             reduction="sum"):
    """Heterogeneous proxy transfer (code v1). A term whose weight is 0 may get None logits (its frozen forward is
    then skipped) and reports 0.

    Shapes: logits (B, C). Returns (total, {"proxy_loss", "anchor_loss"}).
    """
    _check_reduction(reduction)
    zero = target_adv_logits.new_zeros((), dtype=torch.float32)
    parts = {}
    for name, weight, teacher in (("proxy", proxy_weight, proxy_adv_logits),
                                  ("anchor", anchor_weight, anchor_clean_logits)):
        if weight == 0:
            parts[name] = zero
            continue
        if teacher is None:
            raise ValueError(f"hpt: the {name} term has weight {weight} but no {name} logits were given")
        parts[name] = ops.kd_kl_loss(target_adv_logits, teacher, reduction=reduction)
    total = proxy_weight * parts["proxy"] + anchor_weight * parts["anchor"]
    return total, {"proxy_loss": parts["proxy"].detach(), "anchor_loss": parts["anchor"].detach()}
