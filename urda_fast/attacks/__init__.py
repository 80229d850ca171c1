"""Adversarial attacks whose every step is the fused :func:`urda_fast.ops.pgd_step_`."""

from .autoattack import AutoAttack
from .base import Attack
from .bim import BIM
from .fgsm import FGSM
from .pgd import PGD
from .pgdl2 import PGDL2

__all__ = ["Attack", "AutoAttack", "BIM", "FGSM", "PGD", "PGDL2"]
