"""One HPT training step outside a run: an ``HptTask`` built straight from CLIP models and a fixed batch -- no world,
dataset, data loader or training loop -- for the step benchmark (``bench/bench_hpt_step.py``) and ``urda-fast
profile hpt``, which both time exactly what ``train`` runs per step.

    models = load_step_models("urda-tiny-vit", "urda-tiny-rn")          # random init; or target="ARCH:CKPT", ...
    built = build_hpt_step(models, step_config(attack_steps=5), batch_size=64)
    built.step()                                                        # training_step + backward + SGD step

The task is in GPD's HPT phase from its first step (``warmup_steps=0``): proxy and anchor terms both active, as in
the bulk of a run. The anchor is a copy of the target's starting weights, as ``build_task`` makes it by default.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from urda_fast.distributed import pick_device
from urda_fast.profiling import nvtx_range

from .clip_models import load_clip, load_clip_arg
from .config import TrainConfig, parse_trainable, text_frozen
from .train import HptTask, build_schedule, make_optimizer
from .zero_shot import ZeroShotClassifier

# Long enough that the cosine lr barely moves over a benchmark or profile; the step's cost does not depend on it.
SCHEDULE_STEPS = 1_000_000


class FixedBatch:
    """A training stream that yields the same ``(x, y)`` forever: every timed step does the same work."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __iter__(self):
        return self

    def __next__(self):
        return self.x, self.y


@dataclass
class StepModels:
    """The CLIPs of one HPT step, on ``device``: the target to train, the frozen proxy, and their tokenizers."""

    target: torch.nn.Module
    target_tokenizer: object
    proxy: torch.nn.Module
    proxy_tokenizer: object
    device: torch.device


@dataclass
class HptStep:
    """A ready step: ``step()`` runs training_step + backward + optimizer step on ``task``'s fixed batch."""

    task: HptTask
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor

    def loss(self) -> torch.Tensor:
        return self.task.training_step()["loss"]

    def step(self) -> torch.Tensor:
        loss = self.loss()
        with nvtx_range("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with nvtx_range("optimizer"):
            self.optimizer.step()
        return loss.detach()


def load_step_models(target_arch: str = "urda-tiny-vit", proxy_arch: str = "urda-tiny-rn", *, target: str = "",
                     proxy: str = "", device: str | torch.device = "auto", seed: int = 0) -> StepModels:
    """The target and proxy CLIPs: ``target`` / ``proxy`` as ``"ARCH:CHECKPOINT"`` (real weights), else randomly
    initialised ``target_arch`` / ``proxy_arch`` (seeded, so two calls build the same models)."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    torch.manual_seed(seed)
    loaded = []
    for role, spec, arch in (("target", target, target_arch), ("proxy", proxy, proxy_arch)):
        if spec:
            model, tokenizer, _ = load_clip_arg(spec, role, dev)
        else:
            model, tokenizer = load_clip(arch, None, dev)
        loaded += [model, tokenizer]
    return StepModels(*loaded, device=dev)


def step_config(*, attack_steps: int = 5, trainable: str = "all", attack_random_start: bool = False,
                **overrides) -> TrainConfig:
    """The run configuration of the step: method ``hpt`` with the code's weights (proxy 1, anchor 0.001), PGD-5 at
    eps 2/255, step 1/255. No random start by default, so that two implementations of the step can be compared
    number for number."""
    parse_trainable(trainable)
    return TrainConfig(method="hpt", attack_steps=attack_steps, trainable=trainable,
                       attack_random_start=attack_random_start, warmup_steps=0, **overrides)


def class_names(count: int) -> list:
    """``count`` distinct class names for the zero-shot heads (their text only has to be tokenizable)."""
    if count < 2:
        raise ValueError(f"hpt: a classification step needs at least 2 classes, got {count}")
    return [f"class {i}" for i in range(count)]


def build_hpt_step(models: StepModels, cfg: TrainConfig, *, batch_size: int = 64, image_size: int = 0,
                   num_classes: int = 10, seed: int = 0) -> HptStep:
    """An ``HptTask`` (in the HPT phase, its scheduler set) and its SGD optimizer on a fixed random batch.

    ``models.target`` is trained in place (with ``cfg.trainable`` other than "all" its text tower is frozen,
    and the target head caches its text features, as ``build_task`` does); the anchor is a copy of its weights now.
    ``image_size`` 0 = the target's input size. Raises ValueError for a config outside the HPT phase's methods."""
    if cfg.method not in ("hpt", "hpt-gpd"):
        raise ValueError(f"hpt: the HPT step needs method 'hpt' or 'hpt-gpd', got {cfg.method!r}")
    if batch_size < 1:
        raise ValueError(f"hpt: batch_size must be >= 1, got {batch_size}")
    target, device = models.target, models.device
    anchor = copy.deepcopy(target)
    optimizer = make_optimizer(target, cfg)
    names = class_names(num_classes)

    def head(clip, tokenizer, cache_text=True):
        return ZeroShotClassifier(clip, tokenizer, names, cfg.templates, logits=cfg.logits,
                                  preprocess=cfg.preprocess, cache_text=cache_text)

    target_head = head(target, models.target_tokenizer, cache_text=text_frozen(cfg.trainable))
    proxy_head, anchor_head = head(models.proxy, models.proxy_tokenizer), head(anchor, models.target_tokenizer)
    size = image_size or (target_head.image_size or (224, 224))[0]
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 3, size, size, generator=generator).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
    schedule = build_schedule(cfg, SCHEDULE_STEPS)  # step_config's warmup_steps=0: the HPT phase from step 0
    task = HptTask(cfg, target_head, proxy_head, anchor_head, FixedBatch(x, y), schedule, [],
                   models.target_tokenizer)
    task.scheduler = schedule.scheduler(optimizer)
    return HptStep(task, optimizer, x, y)
