"""UDA methods for DART step 1 (source-only, DANN, CDAN, MDD), after the Transfer-Learning-Library (tllib).

Each method is a :class:`UDAMethod`: it owns the classifier and its own modules, and ``training_step(x_s, y_s, x_t)``
returns ``{"loss", "cls_loss", "transfer_loss", ...metrics}``. Pick one by name with :func:`create_method`.
"""

from __future__ import annotations

from .base import UDAMethod
from .cdan import CDAN, ConditionalDomainAdversarialLoss, MultiLinearMap, RandomizedMultiLinearMap, entropy_weights
from .dann import DANN, DomainAdversarialLoss, domain_bce
from .mdd import MDD, ClassificationMarginDisparityDiscrepancy, mdd_head, shift_log
from .modules import (
    DomainDiscriminator,
    GradientReverseFunction,
    GradientReverseLayer,
    WarmStartGradientReverseLayer,
    binary_accuracy,
    entropy,
    warm_start_coefficient,
)
from .source_only import SourceOnly

METHODS: dict[str, type[UDAMethod]] = {cls.name: cls for cls in (SourceOnly, DANN, CDAN, MDD)}


def create_method(name: str, model, **options) -> UDAMethod:
    """The UDA method ``name`` ("source-only", "dann", "cdan", "mdd") around ``model``; ``options`` go to its
    constructor (e.g. ``trade_off=1.0``, ``entropy_conditioning=True`` for CDAN+E)."""
    if name not in METHODS:
        raise ValueError(f"urda_fast: unknown UDA method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name](model, **options)


__all__ = ["CDAN", "DANN", "MDD", "METHODS", "ClassificationMarginDisparityDiscrepancy",
           "ConditionalDomainAdversarialLoss", "DomainAdversarialLoss", "DomainDiscriminator",
           "GradientReverseFunction", "GradientReverseLayer", "MultiLinearMap", "RandomizedMultiLinearMap",
           "SourceOnly", "UDAMethod", "WarmStartGradientReverseLayer", "binary_accuracy", "create_method",
           "domain_bce", "entropy", "entropy_weights", "mdd_head", "shift_log", "warm_start_coefficient"]
