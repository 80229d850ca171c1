r"""GPD: one run split by its learning-rate schedule into two phases, each with its own loss weights.

For step :math:`s = 0, 1, \ldots, N-1` (0-based, the step the optimiser is about to take), warm-up length W:

.. math::
    \mathrm{lr}(s) = \begin{cases} \mathrm{lr}_{warm} \cdot (s+1)/W & s < W \quad \text{(a) generalization-anchored warm-up}\\
    \tfrac12\,(1 + \cos(\pi (s-W)/(N-W)))\,\mathrm{lr} & s \ge W \quad \text{(b) generalization-pulled HPT}\end{cases}

which is open_clip's ``cosine_lr`` (the code's) when :math:`\mathrm{lr}_{warm} = \mathrm{lr}`. Phase (a) uses the
warm-up loss weights (proxy, anchor), phase (b) the HPT ones.

    schedule = GPDSchedule(total_steps=10000, warmup_steps=1000, lr=5e-5, warmup_weights=(0.0, 1.0))
    scheduler = schedule.scheduler(optimizer)           # a LambdaLR; scheduler.last_epoch is the next step s
    proxy_w, anchor_w = schedule.weights_at(scheduler.last_epoch)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPDSchedule:
    """Learning rate and (proxy, anchor) loss weights per step.

    Args:
        total_steps: N, steps of the whole run. warmup_steps: W, length of phase (a), 0 <= W < N.
        lr: peak lr of phase (b) (it decays from there to 0). warmup_lr: peak of the warm-up ramp (None = lr).
        warmup_weights, hpt_weights: (proxy, anchor) loss weights in phases (a) and (b).
    """

    total_steps: int
    warmup_steps: int
    lr: float
    warmup_lr: float | None = None
    warmup_weights: tuple = (0.0, 1.0)
    hpt_weights: tuple = (1.0, 0.001)

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"hpt: the run needs at least one step, got total_steps={self.total_steps}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"hpt: warmup_steps ({self.warmup_steps}) must lie in [0, total steps = "
                             f"{self.total_steps}) so that the cosine phase happens; lower --warmup-steps or raise "
                             "--iterations/--epochs")
        if self.lr <= 0 or (self.warmup_lr is not None and self.warmup_lr < 0):
            raise ValueError(f"hpt: lr must be > 0 and warmup_lr >= 0, got lr={self.lr}, warmup_lr={self.warmup_lr}")

    def phase(self, step: int) -> str:
        """"warmup" (phase a) or "hpt" (phase b)."""
        return "warmup" if step < self.warmup_steps else "hpt"

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            peak = self.lr if self.warmup_lr is None else self.warmup_lr
            return peak * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress)) * self.lr

    def weights_at(self, step: int) -> tuple:
        """(proxy weight, anchor weight) of the loss at ``step``."""
        return tuple(self.warmup_weights if step < self.warmup_steps else self.hpt_weights)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """A LambdaLR giving every parameter group ``lr_at(step)`` (their lr must be ``self.lr``)."""
        for group in optimizer.param_groups:
            if group["lr"] != self.lr:
                raise ValueError(f"hpt: the optimizer's lr ({group['lr']}) differs from the schedule's ({self.lr})")
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_at(step) / self.lr)
