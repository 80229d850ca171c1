"""DART configurations: the papers' (and the authors' code's) values as defaults; see shared methods.md §1."""

from __future__ import annotations

from dataclasses import dataclass

from urda_fast.config import check_ranges


@dataclass
class RunConfig:
    """Settings every DART run shares: data, loop, precision, device."""

    data: str = "digits"  # "digits" (embedded, offline) | "office31" | "officehome" | "visda" | "digits-files"
    root: str = ""  # dataset root for the real benchmarks
    source: str = ""  # source domain (e.g. A for Office-31); the embedded digits ignore it
    target: str = ""  # target domain
    out: str = "runs/dart"
    iterations: int = 10000
    batch_size: int = 32
    eval_every: int = 500
    seed: int = 0
    amp: str = "none"  # "none" | "bf16" | "fp16"
    channels_last: bool = False
    # Attacks run on the model with each conv/linear -> BatchNorm pair folded into one layer (eval mode: the same
    # function, fewer passes; urda_fast.attacks.fold). "auto": when torch.fx can trace the model | "on" | "off".
    fold_batchnorm: str = "auto"
    nvtx: bool = False
    resume: bool = False
    overwrite: bool = False  # start over in an --out that holds a run's checkpoints (else: an error)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" ...
    progress: bool = True
    tensorboard: bool = True  # TensorBoard scalars in <out>/tb beside log.csv
    stop_after: int = 0  # end the run after this iteration, as a kill would (resume tests); 0 = never


@dataclass
class PretrainConfig(RunConfig):
    """Step 1: a UDA model (tllib recipe: SGD nesterov, lr 0.01, backbone x0.1, lr (1+0.001 it)^-0.75)."""

    method: str = "dann"  # "source-only" | "dann" | "cdan" | "mdd"
    arch: str = "digits_cnn"  # backbone: digits_cnn | resnet18 | resnet50
    backbone_weights: str = ""  # local file of pretrained backbone weights ("" = random init)
    bottleneck_dim: int = 256  # tllib: 256 (1024 for MDD)
    trade_off: float = 1.0
    entropy_conditioning: bool = False  # CDAN+E
    margin: float = 4.0  # MDD's gamma
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-3
    lr_gamma: float = 0.001
    lr_decay: float = 0.75
    vat: bool = False  # the UDA+VAT baseline: PGD adversarial source batches
    vat_target: bool = False  # ... and adversarial pseudo-labelled target batches
    vat_threshold: float = 0.9  # confidence needed for a target pseudo-label
    vat_eps: float = 8 / 255
    vat_alpha: float = 2 / 255
    vat_steps: int = 10


@dataclass
class RobustifyConfig(RunConfig):
    """Step 2: disentangled distillation of the frozen UDA teacher into a student on unlabelled target data."""

    teacher: str = ""  # the step-1 checkpoint (best.pt of `dart pretrain`)
    iterations: int = 10000
    batch_size: int = 18
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 1e-3
    lr_gamma: float = 0.001
    lr_decay: float = 0.75
    kl_weight: float = 0.1  # lambda
    tau_robust: float = 2.0  # tau_1, robustness branch
    tau_transfer: float = 2.0  # tau_2, transferability branch
    feature_weight: float = 1.0
    weighting: str = "per-sample"  # "per-sample": mean_i w_i KL_i | "code": batchmean KL * sum_i w_i (authors' code)
    student_init: str = "teacher"  # "teacher" | "backbone" (fresh head on backbone_weights, as the authors' code)
    backbone_weights: str = ""
    attack_space: str = "pixel"  # "pixel" (eps in [0,1] units) | "normalized" (authors' code: eps 0.1, step 0.05)
    attack_eps: float = 8 / 255
    attack_alpha: float = 2 / 255
    attack_steps: int = 10
    attack_random_start: bool = False  # I-FGSM, as the authors' code
    forward: str = "split-bn"  # "split-bn": clean+adversarial in one forward, BN stats per batch | "separate"


def check_pretrain_config(cfg: PretrainConfig) -> None:
    """Values no run can mean (a negative lr or loss weight trains *away* from the task without a word): errors
    before any work. The loop checks its own settings (LoopSettings) and the attacks their budgets."""
    check_ranges(cfg, "dart", positive=("lr", "margin"), fraction=("momentum",),
                 non_negative=("weight_decay", "lr_gamma", "lr_decay", "trade_off", "vat_threshold"))


def check_robustify_config(cfg: RobustifyConfig) -> None:
    check_ranges(cfg, "dart", positive=("lr", "tau_robust", "tau_transfer"), fraction=("momentum",),
                 non_negative=("weight_decay", "lr_gamma", "lr_decay", "kl_weight", "feature_weight"))
