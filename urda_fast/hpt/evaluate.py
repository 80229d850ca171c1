"""Zero-shot robust evaluation of CLIPs over many datasets, and the proxy-robustness check.

    result = zero_shot_robustness(clip, tokenizer, sets, attack="pgd10", eps=1/255, alpha=1/255)
    # {"per_dataset": {"cifar10": {"clean": 88.1, "robust": 31.0, "count": 10000}, ...}, "clean": avg, "robust": avg}
    check = proxy_robustness(target_head, proxy_head, loader, eps=1/255, alpha=1/255, steps=10)
    # {"target_clean", "target_whitebox", "proxy_clean", "proxy_on_target_adv", "count"}

Accuracies are percentages; averages are over datasets (each counts once, as in the papers' tables).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from urda_fast.attacks import PGD, AutoAttack
from urda_fast.attacks.base import frozen_eval
from urda_fast.data import eval_loader
from urda_fast.evaluate import robust_accuracy

from .prompts import PROMPT_MODES
from .zero_shot import ZeroShotClassifier


# The code's CW loss, -relu(z_y - max_other + 50), is the margin clamped at kappa = 50: with cosine logits (|z| <= 1)
# it never saturates, so broken samples keep moving, as there.
CW_KAPPA = 50.0


def make_attack(head, name: str, eps: float, alpha: float, seed: int = 0, num_classes: int = 10):
    """``"pgdK"`` (PGD-L-inf, CE, random start), ``"cwK"`` (PGD on the CW margin, the code's kappa), ``"autoattack"``
    or ``"none"``."""
    if name == "none":
        return None
    if eps <= 0 or alpha <= 0:
        raise ValueError(f"hpt: attack budgets must be > 0, got eps={eps}, alpha={alpha}")
    for prefix, loss in (("pgd", "ce"), ("cw", "cw")):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            steps = int(name[len(prefix):])
            if steps < 1:
                raise ValueError(f"hpt: attack {name!r} takes no step; give at least one, e.g. {prefix}10")
            return PGD(head, eps=eps, alpha=alpha, steps=steps, loss=loss, seed=seed,
                       kappa=CW_KAPPA if loss == "cw" else 0.0)
    if name == "autoattack":
        return AutoAttack(head, eps=eps, num_classes=num_classes, seed=seed)
    raise ValueError(f"hpt: unknown attack {name!r}; choose pgdK (e.g. pgd10), cwK (e.g. cw10), autoattack or none")


def zero_shot_robustness(clip, tokenizer, sets, *, attack: str = "pgd10", eps: float = 1 / 255,
                         alpha: float = 1 / 255, batch_size: int = 256, max_batches: int = 0,
                         templates=("This is a photo of a {}",), logits: str = "cosine", preprocess: str = "imagenet",
                         prompts: str = "template", num_workers: int = 0, seed: int = 0, progress: bool = True) -> dict:
    """Clean and attacked zero-shot accuracy of ``clip`` on each ``ZeroShotSet`` of ``sets`` (class names from the
    set, text features computed once per set). ``max_batches`` > 0 limits the batches per set. ``prompts``:
    ``"template"`` puts each set's class names into ``templates``; ``"code"`` scores a set that has the code's own
    prompts (``ZeroShotSet.prompts``, :mod:`.prompts`) with those, and the others with ``templates``."""
    if not sets:
        raise ValueError("hpt: give at least one dataset to evaluate on")
    if prompts not in PROMPT_MODES:
        raise ValueError(f"hpt: prompts must be one of {PROMPT_MODES}, got {prompts!r}")
    device = next(clip.parameters()).device
    per_dataset = {}
    for zs in sets:
        own = prompts == "code" and zs.prompts is not None
        head = ZeroShotClassifier(clip, tokenizer, zs.prompts if own else zs.classnames, ("{}",) if own else templates,
                                  logits=logits, preprocess=preprocess)
        attacks = {"clean": None}
        robust = make_attack(head, attack, eps, alpha, seed, num_classes=len(zs.classnames))
        if robust is not None:
            attacks["robust"] = robust
        loader = eval_loader(zs.dataset, batch_size, num_workers, device)
        table = robust_accuracy(head, loader, attacks, device=device, max_batches=max_batches or None,
                                progress=progress)
        per_dataset[zs.name] = {"clean": table["clean"].accuracy, "count": table["clean"].count,
                                "prompts": "code" if own else "template"}
        if robust is not None:
            per_dataset[zs.name]["robust"] = table["robust"].accuracy
    result = {"per_dataset": per_dataset, "attack": attack, "eps": eps,
              "clean": sum(r["clean"] for r in per_dataset.values()) / len(per_dataset)}
    if attack != "none":
        result["robust"] = sum(r["robust"] for r in per_dataset.values()) / len(per_dataset)
    return result


def proxy_robustness(target_head, proxy_head, loader, *, eps: float = 1 / 255, alpha: float = 1 / 255,
                     steps: int = 10, max_batches: int = 0, seed: int = 0, progress: bool = True) -> dict:
    """White-box PGD accuracy of the target against the proxy's accuracy on those same adversarial images.

    Proxy robustness (the HPT paper's observation) shows as ``proxy_on_target_adv`` far above ``target_whitebox``."""
    attack = PGD(target_head, eps=eps, alpha=alpha, steps=steps, seed=seed)
    device = next(target_head.parameters()).device
    correct = {"target_clean": 0, "target_whitebox": 0, "proxy_clean": 0, "proxy_on_target_adv": 0}
    count = 0
    total = min(len(loader), max_batches) if max_batches else len(loader)
    for index, (images, labels) in enumerate(tqdm(loader, desc="proxy check", total=total, disable=not progress)):
        if max_batches and index >= max_batches:
            break
        images, labels = images.to(device), labels.to(device)
        adv = attack(images, labels)
        with torch.no_grad(), frozen_eval(target_head), frozen_eval(proxy_head):
            for key, head, x in (("target_clean", target_head, images), ("target_whitebox", target_head, adv),
                                 ("proxy_clean", proxy_head, images), ("proxy_on_target_adv", proxy_head, adv)):
                correct[key] += int((head(x).argmax(1) == labels).sum())
        count += labels.shape[0]
    if count == 0:
        raise ValueError("hpt: the proxy check saw no images (empty dataset?)")
    return {**{k: 100.0 * v / count for k, v in correct.items()}, "count": count, "eps": eps, "steps": steps}
