"""Robust fine-tuning of a CLIP on the shared training loop: TeCoA, PMG-AFT, HPT and HPT-GPD (methods.md §2).

    result = train(TrainConfig(target="ViT-B-32:ckpts/vitb32.pt", proxy="ViT-B-16:ckpts/vitb16.pt",
                               train_data="tinyimagenet", root="~/data", method="hpt-gpd"))

One step (``HptTask.training_step``): a batch (x, y) of the training classes; the target's class text features once
(with gradients when the text tower trains, then shared by the attack, detached, and by the loss); PGD-L-inf on the
target with CE on the true labels; the target's logits on x_adv; the frozen proxy (on x_adv) and anchor (on x) in
inference mode, skipped when their loss weight is 0 in the current phase; the method's loss (``losses``). After the
optimizer step the target's logit_scale is clamped to <= ln(100). GPD's phases and weights come from
``GPDSchedule`` at the step about to be taken.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch.utils.data import TensorDataset

from urda_fast import distributed
from urda_fast.attacks import PGD
from urda_fast.config import check_choices, check_ranges, warn_unused
from urda_fast.data import loader_workers, subset, train_stream
from urda_fast.distributed import pick_device
from urda_fast.optim import sgd
from urda_fast.profiling import nvtx_for, nvtx_range
from urda_fast.run_files import input_fingerprints, refuse_to_overwrite
from urda_fast.train import AMP_MODES, LoopSettings, fit, require_metric

from . import losses
from .clip_models import compile_image_tower, load_clip_arg, parse_model_arg
from .config import METHODS, TrainConfig, parse_trainable, text_frozen
from .data import ZeroShotSet, dataset_names, eval_transform, open_dataset, tinyimagenet
from .evaluate import zero_shot_robustness
from .schedule import GPDSchedule
from .world import World, WorldRecipe, default_world_dir
from .zero_shot import LOGITS, PREPROCESS, ZeroShotClassifier, parse_templates

WORLD_VAL_SETS = ("world:digits", "world:handwritten", "world:style")
KL_SUM_PARTS = ("proxy_loss", "anchor_loss", "original_loss", "clean_loss")  # kd_kl_loss terms, summed by kl_reduction
AMP_CHOICES = ("auto", *AMP_MODES)


def resolve_amp(amp: str, device: torch.device) -> str:
    """``"auto"`` = fp16 on CUDA (the code's mixed precision), none on CPU (fp16 autocast is slow there)."""
    if amp == "auto":
        return "fp16" if device.type == "cuda" else "none"
    if amp not in AMP_CHOICES:
        raise ValueError(f"hpt: amp must be one of {', '.join(map(repr, AMP_CHOICES))}, got {amp!r}")
    return amp


def open_world(folder: str) -> World:
    """The world in ``folder``, else the default recipe's cached world (built by ``hpt demo``)."""
    return World(folder or default_world_dir(WorldRecipe()))


def training_set(cfg: TrainConfig, world: World | None) -> ZeroShotSet:
    if cfg.train_data == "world":
        images, labels = world.split("train")
        return ZeroShotSet("world:train", TensorDataset(images, labels), world.classnames("train"))
    if cfg.train_data == "tinyimagenet":
        return tinyimagenet(os.path.expanduser(cfg.root), eval_transform(cfg.image_size))
    if cfg.train_data == "imagefolder":
        return open_dataset(f"folder:{cfg.root}", image_size=cfg.image_size)
    raise ValueError(f"hpt: train_data must be 'tinyimagenet', 'imagefolder' or 'world', got {cfg.train_data!r}")


def validation_sets(cfg: TrainConfig, world: World | None, train_set: ZeroShotSet) -> list:
    """``cfg.val_data``'s sets; by default the world's zero-shot sets, TinyImageNet's val split, or (an ImageFolder,
    which has no other) the training data. Each is cut to the fixed random sample of ``eval_max_batches`` x
    ``batch_size`` images that ``hpt eval --max-batches`` takes with the same seed and batch size (the first batches
    of a class-sorted set, e.g. an ImageFolder, would hold one or two classes only); under DDP with the global batch,
    W x ``batch_size``, which rank 0 evaluates."""
    if cfg.val_data:
        sets = [open_dataset(name, cfg.root, cfg.image_size, world)
                for name in dataset_names(cfg.val_data, "hpt train: val_data")]
    elif world is not None:
        sets = [open_dataset(name, world=world) for name in WORLD_VAL_SETS]
    elif cfg.train_data == "tinyimagenet":  # best.pt chosen on held-out images, not on the ones it trained on
        sets = [tinyimagenet(os.path.expanduser(cfg.root), eval_transform(cfg.image_size), split="val")]
    else:
        sets = [train_set]
    count = cfg.eval_max_batches * cfg.batch_size * distributed.context().world_size  # the global batch under DDP
    return [dataclasses.replace(zs, dataset=subset(zs.dataset, count, cfg.seed)) for zs in sets]


def metric_key(set_name: str) -> str:
    """How a validation set's name prefixes its metrics: "world:digits" -> "digits", "folder:/a/b" -> "folder__a_b"."""
    return set_name.replace("world:", "").replace(":", "_").replace("/", "_")


def eval_metric_names(val_sets) -> list:
    """The keys ``HptTask.evaluate`` returns for these validation sets: what ``select_metric`` may name."""
    names = ["clean_acc", "robust_acc"]
    for zs in val_sets:
        names += [f"{metric_key(zs.name)}_clean", f"{metric_key(zs.name)}_robust"]
    return names


def _has_batchnorm(module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


class HptTask:
    """The shared loop's task for one method (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, head: ZeroShotClassifier, proxy: ZeroShotClassifier | None,
                 anchor: ZeroShotClassifier | None, stream, schedule: GPDSchedule, val_sets, tokenizer,
                 num_workers: int = 0):
        self.cfg, self.head, self.proxy, self.anchor, self.stream = cfg, head, proxy, anchor, stream
        self.schedule, self.val_sets, self.tokenizer, self.num_workers = schedule, val_sets, tokenizer, num_workers
        self.name, self.scheduler = cfg.method, None  # the scheduler is set once the optimizer exists
        self.attack = PGD(head, eps=cfg.attack_eps, alpha=cfg.attack_alpha, steps=cfg.attack_steps,
                          random_start=cfg.attack_random_start)  # global RNG: checkpointed, so resume is exact
        # Without BatchNorm a joint forward of [x, x_adv] equals two forwards; with it, batch statistics would mix.
        self.joint_forward = not _has_batchnorm(head.clip.visual)
        for frozen in (proxy, anchor):
            if frozen is not None:
                frozen.eval().requires_grad_(False)
        if cfg.compile:
            for model in (head, proxy, anchor):
                if model is not None:
                    compile_image_tower(model.clip)

    def modules(self):
        return {"target": self.head.clip}

    def streams(self):
        return {"train": self.stream}

    def _frozen_logits(self, head, images):
        with torch.inference_mode():
            logits = head(images)
        return logits.clone()  # a normal tensor again, so autograd may save it for the loss's backward

    def training_step(self):
        cfg, head = self.cfg, self.head
        with nvtx_range("data"):
            x, y = next(self.stream)
        step = self.scheduler.last_epoch
        with nvtx_range("text"):
            text = head.text_features()
        with nvtx_range("attack"), head.pinned_text(text.detach()):
            x_adv = self.attack(x, y)
        head.train()
        with nvtx_range("target forward"):
            if cfg.method == "pmg-aft" and self.joint_forward:
                clean_logits, adv_logits = head(torch.cat([x, x_adv]), text).split(x.shape[0])
            else:
                adv_logits = head(x_adv, text)
                clean_logits = head(x, text) if cfg.method == "pmg-aft" else None
        # KL "sum" under DDP: gradients are averaged over ranks, so scale by the world size to keep the code's
        # single-process sum over the global batch (CE is a mean, which averaging already preserves).
        kl_scale = distributed.context().world_size if cfg.kl_reduction == "sum" else 1
        if cfg.method == "tecoa":
            with nvtx_range("loss"):
                total, parts = losses.tecoa_loss(adv_logits, y)
        elif cfg.method == "pmg-aft":
            with nvtx_range("anchor forward"):
                original = self._frozen_logits(self.anchor, x_adv)
            with nvtx_range("loss"):
                total, parts = losses.pmg_aft_loss(adv_logits, y, original, clean_logits,
                                                   original_weight=cfg.pmg_original_weight * kl_scale,
                                                   clean_weight=cfg.pmg_clean_weight * kl_scale,
                                                   reduction=cfg.kl_reduction, direction=cfg.pmg_kl_direction)
        else:
            proxy_weight, anchor_weight = self.schedule.weights_at(step)
            with nvtx_range("proxy forward"):
                proxy_logits = self._frozen_logits(self.proxy, x_adv) if proxy_weight else None
            with nvtx_range("anchor forward"):
                anchor_logits = self._frozen_logits(self.anchor, x) if anchor_weight else None
            with nvtx_range("loss"):
                total, parts = losses.hpt_loss(adv_logits, proxy_logits, anchor_logits,
                                               proxy_weight=proxy_weight * kl_scale,
                                               anchor_weight=anchor_weight * kl_scale, reduction=cfg.kl_reduction)
            parts["warmup"] = float(self.schedule.phase(step) == "warmup")
        if kl_scale != 1:  # each rank's KL sums; the logged rank mean times W is the global batch's sum
            parts = {k: v * kl_scale if k in KL_SUM_PARTS else v for k, v in parts.items()}
        return {"loss": total, **parts}

    @torch.no_grad()
    def after_step(self):
        self.head.clip.logit_scale.clamp_(0, self.cfg.logit_scale_max)

    def metric_names(self):
        return eval_metric_names(self.val_sets)

    def evaluate(self):
        cfg = self.cfg
        # the val sets are already the seeded sample of eval_max_batches x batch_size images (validation_sets)
        result = zero_shot_robustness(self.head.clip, self.tokenizer, self.val_sets, attack=f"pgd{cfg.eval_steps}",
                                      eps=cfg.eval_eps, alpha=cfg.eval_alpha, batch_size=cfg.batch_size,
                                      templates=self.head.templates, prompts="code",  # as `hpt eval` scores them
                                      logits=cfg.logits, preprocess=cfg.preprocess, num_workers=self.num_workers,
                                      seed=cfg.seed, progress=False)
        metrics = {"clean_acc": result["clean"], "robust_acc": result["robust"]}
        for name, row in result["per_dataset"].items():
            key = metric_key(name)
            metrics[f"{key}_clean"], metrics[f"{key}_robust"] = row["clean"], row["robust"]
        return metrics


def check_config(cfg: TrainConfig) -> None:
    if cfg.method not in METHODS:
        raise ValueError(f"hpt: method must be one of {METHODS}, got {cfg.method!r}")
    parse_trainable(cfg.trainable)
    if not cfg.target:
        raise ValueError("hpt: give the CLIP to robustify as --target ARCH:CHECKPOINT")
    if cfg.method in ("hpt", "hpt-gpd") and not cfg.proxy:
        raise ValueError(f"hpt: method {cfg.method} distils a proxy CLIP: give --proxy ARCH:CHECKPOINT (a CLIP of "
                         "another architecture)")
    # Choices the first step or the model loading would check, by which time --overwrite has removed the old run.
    check_choices(cfg, "hpt", {"kl_reduction": losses.REDUCTIONS, "logits": LOGITS, "preprocess": tuple(PREPROCESS),
                               "amp": AMP_CHOICES, "pmg_kl_direction": losses.PMG_DIRECTIONS})
    # (--proxy with tecoa / pmg-aft is not loaded, and not warned about: one command line can sweep every method)
    unused = {}
    if cfg.method not in ("hpt", "hpt-gpd"):
        unused.update(dict.fromkeys(("proxy_weight", "anchor_weight"), "HPT's loss weights need --method hpt or "
                                    "hpt-gpd"))
    if cfg.method != "pmg-aft":
        unused.update(dict.fromkeys(("pmg_original_weight", "pmg_clean_weight", "pmg_kl_direction"),
                                    "PMG-AFT's loss options need --method pmg-aft"))
    if cfg.method != "hpt-gpd":
        unused.update(dict.fromkeys(("warmup_proxy_weight", "warmup_anchor_weight"), "only hpt-gpd has a warm-up "
                                    "phase with loss weights of its own"))
    if cfg.logits == "cosine":
        unused["logit_scale_max"] = "cosine logits do not read logit_scale (--logits clip does)"
    warn_unused(cfg, "hpt", unused)
    if cfg.method == "hpt-gpd" and cfg.warmup_steps == 0:
        import warnings

        warnings.warn("hpt: hpt-gpd with --warmup-steps 0 has no anchored warm-up phase: it trains as --method hpt",
                      stacklevel=2)
    if cfg.proxy and _architecture(cfg.proxy, "proxy") == _architecture(cfg.target, "target"):
        import warnings

        warnings.warn("hpt: the proxy has the target's architecture; HPT's proxy robustness needs a heterogeneous "
                      "proxy (e.g. ViT-B-16 for a ViT-B-32 target)", stacklevel=2)
    # a negative loss weight or lr trains away from its term without a word: refused, as are NaNs
    check_ranges(cfg, "hpt", positive=("attack_eps", "attack_alpha", "eval_eps", "eval_alpha", "lr",
                                       "logit_scale_max", "image_size"),
                 fraction=("momentum",),
                 non_negative=("weight_decay", "warmup_lr", "proxy_weight", "anchor_weight", "warmup_proxy_weight",
                               "warmup_anchor_weight", "pmg_original_weight", "pmg_clean_weight", "iterations",
                               "warmup_steps", "eval_max_batches", "num_workers", "stop_after"),
                 pixel_budget=("attack_eps", "attack_alpha", "eval_eps", "eval_alpha"))
    # a phase whose loss weights are all 0 has no loss to train on (autograd would fail at its first step)
    phases = []
    if cfg.method in ("hpt", "hpt-gpd"):
        phases.append(("HPT phase", ("proxy_weight", "anchor_weight")))
    if cfg.method == "hpt-gpd" and cfg.warmup_steps > 0:
        phases.append(("GPD warm-up phase", ("warmup_proxy_weight", "warmup_anchor_weight")))
    for phase, names in phases:
        if all(getattr(cfg, name) == 0 for name in names):
            raise ValueError(f"hpt: every loss weight of the {phase} of method {cfg.method} is 0 ("
                             f"{', '.join(f'{name}={getattr(cfg, name)}' for name in names)}): its steps would have "
                             "no loss to train on; give one of them a weight > 0"
                             + (" (or --warmup-steps 0: no warm-up)" if phase.startswith("GPD") else ""))
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"hpt: epochs and batch_size must be >= 1, got {cfg.epochs} and {cfg.batch_size}")
    if cfg.attack_steps < 1 or cfg.eval_steps < 1:
        raise ValueError("hpt: attack_steps and eval_steps must be >= 1")
    if cfg.eval_every < 1:
        raise ValueError(f"hpt: eval_every must be >= 1, got {cfg.eval_every}")


def make_optimizer(target, cfg: TrainConfig) -> torch.optim.SGD:
    """The code's SGD over what ``cfg.trainable`` trains: every parameter, the visual tower, or its last N parameter
    tensors (the rest is frozen here, so the text features can be cached)."""
    kind, count = parse_trainable(cfg.trainable)
    visual = [param for name, param in target.named_parameters() if name.startswith("visual.")]
    if count > len(visual):
        raise ValueError(f"hpt: trainable={cfg.trainable!r} asks for more parameter tensors than the target's "
                         f"visual tower has ({len(visual)})")
    chosen = {"all": list(target.parameters()), "visual": visual, "last": visual[-count:]}[kind]
    chosen_ids = {id(param) for param in chosen}
    for param in target.parameters():
        param.requires_grad_(id(param) in chosen_ids)
    params = [p for p in target.parameters() if p.requires_grad]
    return sgd(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _architecture(arg: str, role: str) -> str:
    """The open_clip architecture of ``ARCH:CHECKPOINT``, QuickGELU variants as their base (the same tower)."""
    return parse_model_arg(arg, role)[0].lower().removesuffix("-quickgelu")


def build_schedule(cfg: TrainConfig, total_steps: int) -> GPDSchedule:
    hpt_weights = (cfg.proxy_weight, cfg.anchor_weight)
    # `hpt`: the code's single run, HPT weights throughout; `hpt-gpd`: the anchored warm-up first.
    warmup_weights = (cfg.warmup_proxy_weight, cfg.warmup_anchor_weight) if cfg.method == "hpt-gpd" else hpt_weights
    return GPDSchedule(total_steps=total_steps, warmup_steps=cfg.warmup_steps, lr=cfg.lr,
                       warmup_lr=cfg.warmup_lr or None, warmup_weights=warmup_weights, hpt_weights=hpt_weights)


def input_paths(cfg: TrainConfig) -> dict:
    """``{flag: file}`` of the CLIPs a run reads, and the embedded world's images when it reads them: none may lie
    where it writes (``refuse_to_overwrite``), and a resume refuses any that changed since the run began
    (``input_fingerprints``)."""
    paths = {f"--{role}": parse_model_arg(arg, role)[1] for role, arg in
             (("target", cfg.target), ("proxy", cfg.proxy), ("anchor", cfg.anchor)) if arg}
    if cfg.world and (cfg.train_data == "world" or "world:" in cfg.val_data.lower()):
        paths["--world"] = os.path.join(cfg.world, "data.pt")  # its images: another world is other training data
    return paths


def build_task(cfg: TrainConfig):
    """Everything a run needs, before the loop: (task, optimizer, loop settings, device). The task's scheduler is
    ``task.scheduler``. Used by ``train`` and by the benchmark and profiler, which time ``task.training_step``."""
    check_config(cfg)
    refuse_to_overwrite(cfg.out, input_paths(cfg))
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    world = open_world(cfg.world) if cfg.train_data == "world" or "world:" in cfg.val_data.lower() else None
    templates = parse_templates(cfg.templates)
    train_set = training_set(cfg, world)
    val_sets = validation_sets(cfg, world, train_set)
    require_metric(cfg.select_metric, eval_metric_names(val_sets))  # before the models load
    target, tokenizer, _ = load_clip_arg(cfg.target, "target", device)
    # (proxy, anchor) loss weights of each phase the run has: a frozen CLIP of weight 0 throughout is not loaded
    phases = [(cfg.proxy_weight, cfg.anchor_weight)] if cfg.method in ("hpt", "hpt-gpd") else []
    if cfg.method == "hpt-gpd" and cfg.warmup_steps:
        phases.append((cfg.warmup_proxy_weight, cfg.warmup_anchor_weight))
    heads = {}
    for role, arg, wanted in (("proxy", cfg.proxy, any(proxy for proxy, _ in phases)),
                              ("anchor", cfg.anchor or cfg.target,
                               cfg.method == "pmg-aft" or any(anchor for _, anchor in phases))):
        if wanted:
            clip, tok, _ = load_clip_arg(arg, role, device)
            heads[role] = ZeroShotClassifier(clip, tok, train_set.classnames, templates, logits=cfg.logits,
                                             preprocess=cfg.preprocess)
    optimizer = make_optimizer(target, cfg)
    head = ZeroShotClassifier(target, tokenizer, train_set.classnames, templates, logits=cfg.logits,
                              preprocess=cfg.preprocess, cache_text=text_frozen(cfg.trainable))
    workers = loader_workers(train_set.dataset, cfg.num_workers)
    stream = train_stream(train_set.dataset, cfg.batch_size, cfg.seed, device, num_workers=workers)
    total_steps = cfg.iterations or cfg.epochs * len(stream.loader)
    task = HptTask(cfg, head, heads.get("proxy"), heads.get("anchor"), stream, build_schedule(cfg, total_steps),
                   val_sets, tokenizer, workers)
    task.scheduler = task.schedule.scheduler(optimizer)
    settings = LoopSettings(iterations=total_steps, out_dir=cfg.out, eval_every=cfg.eval_every, resume=cfg.resume,
                            overwrite=cfg.overwrite,
                            amp=resolve_amp(cfg.amp, device), progress=cfg.progress, stop_after=cfg.stop_after or None,
                            tensorboard=cfg.tensorboard, select_metric=cfg.select_metric,
                            cudnn_benchmark=cfg.cudnn_benchmark)
    return task, optimizer, settings, device


def train(cfg: TrainConfig) -> dict:
    """Fine-tune ``cfg.target`` with ``cfg.method``; writes best.pt / last.pt / log.csv / tb under ``cfg.out``.

    Returns the shared loop's result: {"best": metrics of best.pt, "last": ..., "seconds"}."""
    task, optimizer, settings, device = build_task(cfg)
    with nvtx_for(cfg.nvtx):
        return fit(task, optimizer, task.scheduler, settings, device=device,
                   # total_steps: GPD's phases and cosine decay are laid out over it, so a resume may not change it
                   # (as --iterations / --epochs may for DART, whose schedule does not depend on the run's length)
                   extra={"kind": "hpt", "arch": parse_model_arg(cfg.target)[0],
                          "config": {**vars(cfg), "total_steps": settings.iterations},
                          "inputs": input_fingerprints(input_paths(cfg))})
