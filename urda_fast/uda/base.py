"""The contract every UDA method meets: one module that owns the classifier and the method's own modules (domain
discriminator, adversarial head, ...) and turns a source and a target batch into losses."""

from __future__ import annotations

import torch
import torch.nn as nn

from urda_fast.models import ImageClassifier

__all__ = ["UDAMethod", "source_accuracy"]


class UDAMethod(nn.Module):
    """Base class of the UDA methods (DART step 1).

    The classifier is ``self.model`` (so a method's ``state_dict()`` holds it under ``model.``), the method's own
    modules sit beside it. All training state lives in parameters and buffers: ``state_dict()`` is a full resume point.

    Args:
        model (ImageClassifier): ``model(x, return_features=True) -> (logits, features)``, ``model.features_dim``.
        trade_off (float): weight of the transfer loss, ``loss = cls_loss + trade_off * transfer_loss``. Default: 1.0

    Subclasses set ``name`` and implement ``training_step(x_s, y_s, x_t)``, which returns ``{"loss": total to
    backprop, "cls_loss", "transfer_loss", ...metrics}``; everything but ``"loss"`` is detached.
    """

    name: str = ""

    def __init__(self, model: ImageClassifier, *, trade_off: float = 1.0):
        super().__init__()
        self.model = model
        self.trade_off = float(trade_off)  # a constant hyper-parameter, not training state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the classifier (what evaluation and attacks use)."""
        return self.model(x)

    def forward_domains(self, x_s: torch.Tensor, x_t: torch.Tensor):
        """One forward of ``cat(x_s, x_t)`` (BatchNorm sees both domains, as tllib), split back per domain.

        Returns ``(y_s, y_t, f_s, f_t)``: logits (N, K) and features (N, F) per domain."""
        logits, features = self.model(torch.cat((x_s, x_t), dim=0), return_features=True)
        n = x_s.shape[0]
        return logits[:n], logits[n:], features[:n], features[n:]

    def training_step(self, x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses of one step on a labelled source batch ``(x_s, y_s)`` and an unlabelled target batch ``x_t``."""
        raise NotImplementedError

    def param_groups(self, base_lr: float) -> list[dict]:
        """The classifier's groups (backbone at 0.1x) plus one group, at ``base_lr``, of the method's own parameters.

        Each group carries ``"initial_lr"`` too, so a scheduler can be attached at any iteration; ``"params"`` are
        lists (safe to read more than once)."""
        groups = [{**g, "params": list(g["params"])} for g in self.model.param_groups(base_lr)]
        # named_parameters() lists a shared parameter once, under its first name: "model." comes first.
        own = [p for name, p in self.named_parameters() if not name.startswith("model.")]
        if own:
            groups.append({"params": own, "lr": base_lr, "initial_lr": base_lr})
        return groups

    def _metrics(self, loss, cls_loss, transfer_loss, y_s_logits, y_s, **extra) -> dict[str, torch.Tensor]:
        """The returned dict: ``loss`` keeps its graph, every other entry is detached."""
        out = {"loss": loss, "cls_loss": cls_loss, "transfer_loss": transfer_loss,
               "cls_acc": source_accuracy(y_s_logits, y_s), **extra}
        return {k: (v if k == "loss" else v.detach()) for k, v in out.items()}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, trade_off={self.trade_off}"


@torch.no_grad()
def source_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy in percent (tllib's ``cls_acc``), as a detached scalar tensor."""
    return (logits.argmax(dim=1) == labels).float().mean() * 100.0

