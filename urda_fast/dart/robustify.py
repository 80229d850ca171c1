r"""DART step 2: robustification by disentangled distillation (teacher frozen, attack on the student).

Per target batch x (no labels), with the frozen UDA teacher T and the student S:

.. math::
    w_i = 1 - H(\mathrm{softmax}(z^T_i)) / \log C, \qquad \hat y = \arg\max z^T, \qquad
    x^{adv} = \text{I-FGSM}_S(x, \hat y)

    L = \lambda\,\overline{w\,KL_{\tau_1}(z^T \| z^S(x^{adv}))} + \lambda\,\overline{w\,KL_{\tau_2}(z^T \| z^S(x))}
        + \mathrm{MSE}(f^S(x), f^T(x))

The KL terms and the feature MSE run through the fused ops; the attack through the fused PGD step.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch

from urda_fast import distributed, ops
from urda_fast.attacks import PGD
from urda_fast.data import train_stream
from urda_fast.models import ModelSpec
from urda_fast.profiling import nvtx_range
from urda_fast.run_files import input_fingerprints, refuse_to_overwrite
from urda_fast.split_bn import split_batchnorm

from .common import (
    NormalizedSpaceAttack,
    accuracy,
    attack_folding,
    load_checkpoint_model,
    lr_schedule,
    read_checkpoint,
    run_loop,
    sgd,
)
from .config import RobustifyConfig, check_robustify_config
from .data import absolute_root, task_data, with_teacher_data


def confidence_weights(teacher_logits: torch.Tensor, log_offset: float = 0.0) -> torch.Tensor:
    """w_i = 1 - H(p_i) / log C: 1 for a one-hot teacher, 0 for a uniform one. ``log_offset`` > 0 takes the entropy
    as -sum p log(p + offset), as the authors' code does with 1e-5 (weights ~1e-4 apart)."""
    log_p = torch.log_softmax(teacher_logits.float(), dim=1)
    p = log_p.exp()
    entropy = -(p * (torch.log(p + log_offset) if log_offset else log_p)).sum(1)
    return 1.0 - entropy / math.log(teacher_logits.shape[1])


CODE_ENTROPY_OFFSET = 1e-5  # DART.py: -sum(p * log(p + 1e-5))


def dart_loss(student_adv_logits, student_logits, student_features, teacher_logits, teacher_features, cfg):
    """The three DART terms; returns (total, {"robust_loss", "transfer_loss", "feature_loss"})."""
    weight = confidence_weights(teacher_logits, CODE_ENTROPY_OFFSET if cfg.weighting == "code" else 0.0)
    if cfg.weighting == "per-sample":
        robust = ops.kd_kl_loss(student_adv_logits, teacher_logits, temperature=cfg.tau_robust, weight=weight)
        transfer = ops.kd_kl_loss(student_logits, teacher_logits, temperature=cfg.tau_transfer, weight=weight)
    elif cfg.weighting == "code":
        # The code's batch-mean KL times the batch's summed weight: under DDP the sum over the global batch, so W
        # processes of B train as one of W * B (a rank's own sum would be 1/W of it).
        total_weight = distributed.all_reduce_sum(weight.sum())
        robust = ops.kd_kl_loss(student_adv_logits, teacher_logits, temperature=cfg.tau_robust) * total_weight
        transfer = ops.kd_kl_loss(student_logits, teacher_logits, temperature=cfg.tau_transfer) * total_weight
    else:
        raise ValueError(f"dart: weighting must be 'per-sample' or 'code', got {cfg.weighting!r}")
    feature = ops.feature_mse_loss(student_features, teacher_features)
    total = cfg.kl_weight * (robust + transfer) + cfg.feature_weight * feature
    return total, {"robust_loss": robust.detach(), "transfer_loss": transfer.detach(), "feature_loss": feature.detach()}


class DartTask:
    """One DART step per call: teacher forward (no graph), attack on the student, student forward, loss."""

    name = "dart"

    def __init__(self, cfg: RobustifyConfig, teacher, student, target_stream, evaluate_fn):
        self.cfg, self.teacher, self.student, self.stream, self.evaluate_fn = cfg, teacher, student, target_stream, \
            evaluate_fn
        self.teacher.eval().requires_grad_(False)
        self.student_forward = student  # the training forwards; DDP-wrapped under torchrun
        options = dict(eps=cfg.attack_eps, alpha=cfg.attack_alpha, steps=cfg.attack_steps,
                       random_start=cfg.attack_random_start, fold_batchnorm=attack_folding(cfg))
        # The authors' code attacks normalised images (eps in normalised units): "normalized" and "code" do too.
        self.attack = PGD(student, **options) if cfg.attack_space == "pixel" else \
            NormalizedSpaceAttack(PGD, student, cfg.attack_space, **options)

    def modules(self):
        return {"student": self.student}

    def wrap_ddp(self, wrap):
        # Only the student trains: the frozen teacher and the attack (eval mode) stay local to each rank.
        self.student_forward = wrap(self.student)

    def streams(self):
        return {"target": self.stream}

    def training_step(self):
        with nvtx_range("data"):
            x = next(self.stream)[0]
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with nvtx_range("teacher"), torch.no_grad():
            teacher_logits, teacher_features = self.teacher(x, return_features=True)
        with nvtx_range("attack"):
            pseudo_labels = teacher_logits.argmax(1)
            x_adv = self.attack(x, pseudo_labels)
        self.student.train()
        with nvtx_range("student"):
            if self.cfg.forward == "split-bn":
                with split_batchnorm(self.student, [x.shape[0], x.shape[0]]):
                    logits, features = self.student_forward(torch.cat([x, x_adv]), return_features=True)
                clean_logits, adv_logits = logits.split(x.shape[0])
                clean_features = features[: x.shape[0]]
            else:
                clean_logits, clean_features = self.student_forward(x, return_features=True)
                adv_logits = self.student_forward(x_adv)
        with nvtx_range("loss"):
            total, parts = dart_loss(adv_logits, clean_logits, clean_features, teacher_logits, teacher_features,
                                     self.cfg)
        return {"loss": total, **parts}

    def evaluate(self):
        return self.evaluate_fn(self.student)


def build_student(cfg: RobustifyConfig, teacher, spec: ModelSpec):
    if cfg.student_init == "teacher":
        student = copy.deepcopy(teacher)
        student.finetune_backbone = True  # trained weights: the backbone is fine-tuned at 0.1x the learning rate
        return student
    if cfg.student_init == "backbone":
        fresh = ModelSpec(**{**spec.to_dict(), "backbone_weights": cfg.backbone_weights or None})
        return fresh.build()
    raise ValueError(f"dart: student_init must be 'teacher' or 'backbone', got {cfg.student_init!r}")


def robustify(cfg: RobustifyConfig) -> dict:
    """Run DART step 2 from ``cfg.teacher``; writes best.pt / last.pt / log.csv under ``cfg.out``.

    The data is the teacher's (its saved --data, --root, -s, -t) where ``cfg`` gives none; the run saves what it read,
    its root absolute."""
    from urda_fast.models.backbones import NO_PRETRAINED, check_backbone_weights

    check_robustify_config(cfg)
    inputs = {"--teacher": cfg.teacher, "--backbone-weights": cfg.backbone_weights}
    refuse_to_overwrite(cfg.out, inputs)
    torch.manual_seed(cfg.seed)
    state = read_checkpoint(cfg.teacher)
    cfg = absolute_root(with_teacher_data(cfg, state.get("config") or {}))
    teacher, spec, device = load_checkpoint_model(cfg.teacher, cfg.device, state)
    if cfg.student_init == "backbone":
        check_backbone_weights(spec.backbone, cfg.backbone_weights or None)
        if not cfg.backbone_weights and spec.backbone not in NO_PRETRAINED:
            warnings.warn(f"dart: --student-init backbone without --backbone-weights starts the student from a "
                          f"randomly initialised {spec.backbone} (trained at the full learning rate); the authors' "
                          "code starts it from ImageNet weights: give them as --backbone-weights FILE", stacklevel=2)
    data = task_data(cfg, splits=("target_train", "target_test"))  # step 2 reads no source
    if data.num_classes != spec.num_classes:
        raise ValueError(f"dart: the teacher has {spec.num_classes} classes but the target data has "
                         f"{data.num_classes}: it is a checkpoint of another task")
    student = build_student(cfg, teacher, spec).to(device)
    if cfg.channels_last:
        teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
    stream = train_stream(data.target_train, cfg.batch_size, cfg.seed, device, cfg.num_workers)
    task = DartTask(cfg, teacher, student, stream,
                    lambda m: {"clean_acc": accuracy(m, data.target_test, device, num_workers=cfg.num_workers)})
    optimizer = sgd(student.param_groups(cfg.lr), cfg)
    return run_loop(task, optimizer, lr_schedule(optimizer, cfg), cfg, device,
                    extra={"spec": spec.to_dict(), "kind": "dart", "config": vars(cfg),
                           "inputs": input_fingerprints(inputs)})  # a resume refuses a changed teacher
