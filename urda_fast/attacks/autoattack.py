"""AutoAttack's standard suite through whichever implementation is installed.

'Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks', Croce & Hein,
ICML 2020 (https://arxiv.org/abs/2003.01690). Prefers the authors' package (``autoattack``, installed from
github.com/fra31/auto-attack), else torchattacks' port; urda_fast does not reimplement it.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from urda_fast.ops._memo import memo_scope

from .base import frozen_eval

INSTALL_HINT = ("AutoAttack is not installed: `pip install git+https://github.com/fra31/auto-attack` (the authors' "
                "package) or `pip install torchattacks` (a port), then try again")


def autoattack_backend() -> str | None:
    if importlib.util.find_spec("autoattack") is not None:
        return "autoattack"
    if importlib.util.find_spec("torchattacks") is not None:
        return "torchattacks"
    return None


class AutoAttack:
    """Callable like the other attacks: ``AutoAttack(model, eps=8/255)(images, labels)`` -> adversarial images.

    Arguments:
        model: images in [0, 1] -> logits. eps: budget. norm: "Linf" or "L2". version: "standard" (the suite behind
        the RobustBench leaderboard). num_classes: needed by torchattacks' port. seed: random seed.
    """

    def __init__(self, model, eps=8 / 255, norm="Linf", version="standard", num_classes=10, seed=0):
        backend = autoattack_backend()
        if backend is None:
            raise ImportError(INSTALL_HINT)
        if norm not in ("Linf", "L2"):
            raise ValueError(f"urda_fast.attacks: AutoAttack norm must be 'Linf' or 'L2', got {norm!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
            raise ValueError(f"urda_fast.attacks: AutoAttack eps must be positive and finite, got {eps!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"urda_fast.attacks: AutoAttack num_classes must be the model's class count (>= 2), "
                             f"got {num_classes!r}")
        self.model, self.eps, self.norm, self.version, self.backend = model, eps, norm, version, backend
        if num_classes < 4 and version == "standard":
            warnings.warn(f"urda_fast.attacks: AutoAttack runs without APGD-T on a {num_classes}-class model (its "
                          "targeted DLR loss ranks four classes); the other three attacks of the suite run",
                          stacklevel=2)
        if backend == "autoattack":
            self._attack = _authors_suite(model, norm, eps, version, num_classes, seed)
        elif version == "standard":
            self._attack = _torchattacks_standard(model, norm, eps, num_classes, seed)
        else:
            import torchattacks

            self._attack = torchattacks.AutoAttack(model, norm=norm, eps=eps, version=version, n_classes=num_classes,
                                                   seed=seed)

    def __repr__(self):
        return f"AutoAttack(eps={self.eps}, norm={self.norm!r}, version={self.version!r}, backend={self.backend!r})"

    def __call__(self, images, labels):
        with frozen_eval(self.model), memo_scope():  # the model is frozen for the suite's many forwards
            if self.backend == "autoattack":
                adversarial = self._attack.run_standard_evaluation(images, labels, bs=images.shape[0])
            else:
                adversarial = self._attack(images, labels)
        return adversarial.detach()  # like the other attacks (torchattacks' port hands back a tensor requiring grad)


def _authors_suite(model, norm, eps, version, num_classes, seed):
    """The authors' AutoAttack on the model's device (theirs defaults to 'cuda'), attacking at most num_classes - 1
    target classes (their standard version sets 9: an IndexError for fewer than 10 classes)."""
    from autoattack import AutoAttack as _Official

    parameter = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    device = parameter.device if parameter is not None else torch.device("cpu")
    suite = _Official(model, norm=norm, eps=eps, version=version, seed=seed, verbose=False, device=device)
    if version == "standard":
        suite.apgd_targeted.n_target_classes = suite.fab.n_target_classes = min(9, num_classes - 1)
        if num_classes < 4:
            suite.attacks_to_run = [name for name in suite.attacks_to_run if name != "apgd-t"]
    return suite


def _torchattacks_standard(model, norm, eps, num_classes, seed):
    """The standard suite from torchattacks' attacks with the authors' settings: APGD-CE and APGD-T (9 target
    classes; left out below four classes, where its DLR loss fails) and FAB-T at 100 iterations each, then Square at
    5000 queries. torchattacks' own AutoAttack leaves its APGD / FAB at their 10-step defaults (a weaker suite that
    overstates robustness), and takes num_classes - 1 targets (all of a 200-class model's). Still a port: the figures
    can differ a little from the authors'."""
    from torchattacks import APGD, APGDT, FAB, MultiAttack, Square

    targets = min(9, num_classes - 1) + 1  # torchattacks attacks n_classes - 1 target classes
    targeted_dlr = [APGDT(model, norm=norm, eps=eps, steps=100, n_restarts=1, seed=seed, n_classes=targets)]
    return MultiAttack([
        APGD(model, norm=norm, eps=eps, steps=100, n_restarts=1, seed=seed, loss="ce"),
        *(targeted_dlr if num_classes >= 4 else []),
        FAB(model, norm=norm, eps=eps, steps=100, n_restarts=1, seed=seed, multi_targeted=True, n_classes=targets),
        Square(model, norm=norm, eps=eps, n_queries=5000, n_restarts=1, seed=seed),
    ])
