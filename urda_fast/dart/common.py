"""Pieces both DART steps use: device choice, the tllib optimizer and schedule, accuracy, checkpoints, the loop."""

from __future__ import annotations

import os

import torch

from urda_fast.data import eval_loader
from urda_fast.distributed import pick_device
from urda_fast.files import load_torch_file, missing_best_hint, run_checkpoint, state_dict_mismatch
from urda_fast.models import ModelSpec
from urda_fast.optim import sgd as fused_sgd
from urda_fast.profiling import nvtx_for
from urda_fast.train import LoopSettings, fit

from .config import ATTACK_SPACES


class FromNormalized(torch.nn.Module):
    """``model`` seen as a function of normalised images (undoes its own first normalisation)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, z):
        return self.model(z * self.model.normalize.std + self.model.normalize.mean)


class NormalizedSpaceAttack:
    """``attack_cls`` on ``model`` (an ImageClassifier, which normalises its [0, 1] input itself) made on the
    normalised images, in normalised units: called with pixel images, it attacks ``FromNormalized(model)`` on their
    normalised values and returns pixel images again. ``space="code"`` clips every iterate to [0, 1] in normalised
    units, as the DART authors' advertorch call did (``clip``, see :class:`urda_fast.attacks.base.Attack`)."""

    def __init__(self, attack_cls, model, space: str, **kwargs):
        if space == "pixel" or space not in ATTACK_SPACES:
            raise ValueError(f"dart: a normalised-space attack's space is 'normalized' or 'code', got {space!r}")
        self.normalize = model.normalize
        mean, std = self.normalize.mean.flatten(), self.normalize.std.flatten()
        self.attack = attack_cls(FromNormalized(model), space="normalized", mean=mean, std=std,
                                 clip=(0.0, 1.0) if space == "code" else None, **kwargs)

    def __call__(self, images, labels):
        return self.attack(self.normalize(images), labels) * self.normalize.std + self.normalize.mean


def attack_folding(cfg):
    """The attacks' ``fold_batchnorm`` argument for the config's ``fold_batchnorm`` ("auto" | "on" | "off")."""
    choices = {"auto": "auto", "on": True, "off": False}
    if cfg.fold_batchnorm not in choices:
        raise ValueError(f"dart: fold_batchnorm must be one of {sorted(choices)}, got {cfg.fold_batchnorm!r}")
    return choices[cfg.fold_batchnorm]


def sgd(param_groups, cfg) -> torch.optim.Optimizer:
    """tllib's optimizer: SGD, momentum 0.9, nesterov, weight decay 1e-3 (fused: ``urda_fast.optim.sgd``)."""
    return fused_sgd(param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def lr_schedule(optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """lr * (1 + gamma * it) ** -decay, per parameter group (the backbone group keeps its 0.1x)."""
    gamma, decay = cfg.lr_gamma, cfg.lr_decay
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 + gamma * it) ** -decay)


@torch.no_grad()
def accuracy(model, dataset, device, batch_size: int = 256, num_workers: int = 0) -> float:
    """Top-1 accuracy (percent) of ``model`` on a labelled dataset, in eval mode (mode restored after); image files
    are decoded by ``num_workers`` processes (in-memory tensors in this one)."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    loader = eval_loader(dataset, batch_size, num_workers, device)
    correct, total = torch.zeros((), dtype=torch.int64, device=device), 0
    for images, labels in loader:
        # non_blocking from pinned memory: the copy overlaps the host's work; the count stays on the device (one read
        # at the end, not a host sync per batch)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        correct += (model(images).argmax(1) == labels).sum()
        total += labels.shape[0]
    model.train(was_training)
    return 100.0 * int(correct) / max(total, 1)


def read_checkpoint(path: str) -> dict:
    """The state of a `dart pretrain` / `dart robustify` checkpoint (a run folder means its best.pt), or a clear error
    for a missing file, an `hpt train` checkpoint or any other file."""
    if not path:
        raise ValueError("dart: give the checkpoint to start from (e.g. --teacher runs/a2w/best.pt)")
    given, path = path, run_checkpoint(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dart: checkpoint {path!r} not found{missing_best_hint(given)}; run `urda-fast dart "
                                "pretrain` first")
    state = load_torch_file(path, who="dart")
    if isinstance(state, dict) and state.get("kind") == "hpt":
        raise ValueError(f"dart: {path!r} is an `hpt train` checkpoint (a CLIP), not a DART one; evaluate it with "
                         "`urda-fast hpt eval`")
    if not isinstance(state, dict) or "spec" not in state or "modules" not in state:
        raise ValueError(f"dart: {path!r} is not a urda_fast DART checkpoint (no model spec inside)")
    return state


def load_checkpoint_model(path: str, device_name: str = "auto", state: dict | None = None):
    """(model in eval mode, spec, device) from a `dart pretrain` / `dart robustify` checkpoint (``state``: its
    contents, when the caller has read them with :func:`read_checkpoint` already)."""
    path = run_checkpoint(path)
    state = read_checkpoint(path) if state is None else state
    spec = ModelSpec.from_dict(state["spec"])
    device = pick_device(device_name)
    model = spec.build(with_weights=False)
    try:
        if state.get("kind") == "dart":
            weights = state["modules"]["student"]
        else:  # a UDA method's state: the classifier lives under "model." beside the method's own modules
            weights = {k[len("model."):]: v for k, v in state["modules"]["method"].items() if k.startswith("model.")}
        model.load_state_dict(weights)
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"dart: {path!r} does not hold weights for this model spec ({state_dict_mismatch(err)})") \
            from err
    return model.to(device).eval(), spec, device


def load_teacher(path: str, device_name: str):
    return load_checkpoint_model(path, device_name)


def run_loop(task, optimizer, scheduler, cfg, device, extra):
    settings = LoopSettings(iterations=cfg.iterations, out_dir=cfg.out, eval_every=cfg.eval_every,
                            resume=cfg.resume, overwrite=cfg.overwrite, amp=cfg.amp, progress=cfg.progress,
                            stop_after=cfg.stop_after or None, tensorboard=cfg.tensorboard,
                            cudnn_benchmark=cfg.cudnn_benchmark)
    with nvtx_for(cfg.nvtx):
        return fit(task, optimizer, scheduler, settings, device=device, extra=extra)
