"""DART step 1: train a UDA model (source-only, DANN, CDAN, MDD), optionally as the UDA+VAT baseline.

UDA+VAT replaces each labelled source batch by PGD adversarial examples made against the current model (``vat``), and
optionally adds adversarial, confidently pseudo-labelled target batches with a cross-entropy term (``vat_target``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from urda_fast import distributed
from urda_fast.attacks import PGD
from urda_fast.data import train_stream
from urda_fast.distributed import pick_device
from urda_fast.models import ModelSpec
from urda_fast.profiling import nvtx_range
from urda_fast.run_files import input_fingerprints, refuse_to_overwrite

from .common import accuracy, attack_folding, lr_schedule, run_loop, sgd
from .config import PretrainConfig, check_pretrain_config
from .data import absolute_root, task_data


class _MethodStep(torch.nn.Module):
    """The method's training step as a module's forward: what DDP wraps (it syncs only what its forward runs)."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, x_s, y_s, x_t):
        return self.method.training_step(x_s, y_s, x_t)


class UdaTask:
    """One UDA step per call on a source and a target batch; with VAT, on adversarial versions of them."""

    def __init__(self, cfg: PretrainConfig, method, source_stream, target_stream, evaluate_fn):
        self.cfg, self.method, self.source, self.target, self.evaluate_fn = cfg, method, source_stream, \
            target_stream, evaluate_fn
        self.name = f"{method.name}{'+vat' if cfg.vat else ''}"
        self.attack = PGD(method.model, eps=cfg.vat_eps, alpha=cfg.vat_alpha, steps=cfg.vat_steps,
                          fold_batchnorm=attack_folding(cfg)) if cfg.vat else None
        self.step = method.training_step

    def wrap_ddp(self, wrap):
        # The attack and the pseudo-label pass stay local (eval mode, no parameter gradients).
        self.step = wrap(_MethodStep(self.method))

    def modules(self):
        return {"method": self.method}

    def streams(self):
        return {"source": self.source, "target": self.target}

    def training_step(self):
        x_s, y_s = next(self.source)
        x_t = next(self.target)[0]  # target labels are never used for training
        if self.cfg.channels_last:
            x_s, x_t = (x.contiguous(memory_format=torch.channels_last) for x in (x_s, x_t))
        extra = {}
        if self.attack is not None:
            with nvtx_range("attack"):
                x_s = self.attack(x_s, y_s)
                if self.cfg.vat_target:
                    with torch.no_grad():
                        self.method.model.eval()
                        probs = torch.softmax(self.method.model(x_t).float(), dim=1)
                        self.method.model.train()
                    confidence, pseudo = probs.max(1)
                    x_t = self.attack(x_t, pseudo)
                    extra["keep"] = confidence >= self.cfg.vat_threshold
                    extra["pseudo"] = pseudo
        self.method.train()
        with nvtx_range("uda step"):
            out = self.step(x_s, y_s, x_t)
        if "keep" in extra:
            # The whole adversarial target batch goes through the model and the confident samples are picked by a
            # mask, as in FixMatch: x_t[keep] would read the count on the host at every step (a GPU stall), and a
            # single confident sample would make a batch of one, which train-mode BatchNorm refuses (run ended).
            keep = extra["keep"].float()
            per_sample = F.cross_entropy(self.method.model(x_t), extra["pseudo"], reduction="none")
            # the mean over the kept samples (0 if none) of the global batch: under DDP the ranks' gradients are
            # averaged, so each rank's sum is scaled by the rank count over the kept count of all ranks
            kept, ranks = distributed.all_reduce_sum(torch.stack([keep.sum(), keep.new_tensor(1.0)])).unbind()
            pseudo_loss = (per_sample * keep).sum() * ranks / kept.clamp(min=1.0)
            out = dict(out, loss=out["loss"] + pseudo_loss, pseudo_loss=pseudo_loss.detach(),
                       pseudo_kept=keep.mean())
        return out

    def evaluate(self):
        return self.evaluate_fn(self.method.model)


def pretrain(cfg: PretrainConfig) -> dict:
    """Train the step-1 model; writes best.pt / last.pt / log.csv under ``cfg.out`` (its config with the dataset root
    absolute, for `dart eval` and `dart robustify` to read it from anywhere)."""
    from urda_fast.uda import create_method

    check_pretrain_config(cfg)
    cfg = absolute_root(cfg)
    inputs = {"--backbone-weights": cfg.backbone_weights}
    refuse_to_overwrite(cfg.out, inputs)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    data = task_data(cfg)
    spec = ModelSpec(backbone=cfg.arch, num_classes=data.num_classes, bottleneck_dim=cfg.bottleneck_dim,
                     mean=data.mean, std=data.std, backbone_weights=cfg.backbone_weights or None,
                     layout=cfg.classifier)
    model = spec.build()
    options = {"cdan": {"entropy_conditioning": cfg.entropy_conditioning, "randomized": cfg.randomized,
                        "randomized_dim": cfg.randomized_dim},
               "mdd": {"margin": cfg.margin}}
    method = create_method(cfg.method, model, trade_off=cfg.trade_off, **options.get(cfg.method, {})).to(device)
    if cfg.channels_last:
        method = method.to(memory_format=torch.channels_last)
    source = train_stream(data.source_train, cfg.batch_size, cfg.seed, device, cfg.num_workers)
    target = train_stream(data.target_train, cfg.batch_size, cfg.seed + 1, device, cfg.num_workers)
    task = UdaTask(cfg, method, source, target,
                   lambda m: {"clean_acc": accuracy(m, data.target_test, device, num_workers=cfg.num_workers)})
    optimizer = sgd(method.param_groups(cfg.lr), cfg)
    return run_loop(task, optimizer, lr_schedule(optimizer, cfg), cfg, device,
                    extra={"spec": spec.to_dict(), "kind": "uda", "config": vars(cfg),
                           "inputs": input_fingerprints(inputs)})
