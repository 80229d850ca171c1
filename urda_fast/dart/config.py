"""DART configurations: the papers' (and the authors' code's) values as defaults; see shared methods.md §1."""

from __future__ import annotations

from dataclasses import dataclass, field

from urda_fast.config import OVERWRITE_HELP, RESUME_HELP, check_choices, check_ranges, warn_unused
from urda_fast.distributed import check_device

# Where DART's attacks work: "pixel" ([0, 1] images, the model normalises), "normalized" (eps in normalised units,
# each channel kept in the range its pixels map to) or "code" (normalised units, every value clipped to [0, 1], as
# the authors' advertorch call did).
ATTACK_SPACES = ("pixel", "normalized", "code")


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
    # image-decoding processes for the training batches and the evaluations (none for the embedded in-memory digits);
    # the batches do not depend on it
    num_workers: int = 4
    seed: int = 0
    amp: str = "none"  # "none" | "bf16" | "fp16"
    channels_last: bool = False
    # Attacks run on the model with each conv/linear -> BatchNorm pair folded into one layer (eval mode: the same
    # function, fewer passes; urda_fast.attacks.fold). "auto": when torch.fx can trace the model | "on" | "off".
    fold_batchnorm: str = "auto"
    nvtx: bool = False
    cudnn_benchmark: bool = True  # cuDNN picks the fastest convolution algorithms by timing them (GPU; off: the same
    # algorithms in every process, one condition of a bit-for-bit resume on a GPU)
    resume: bool = field(default=False, metadata={"help": RESUME_HELP})
    overwrite: bool = field(default=False, metadata={"help": OVERWRITE_HELP})
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" ...
    progress: bool = True
    tensorboard: bool = True  # TensorBoard scalars in <out>/tb beside log.csv
    stop_after: int = 0  # end the run after this iteration, as a kill would (resume tests); 0 = never


@dataclass
class PretrainConfig(RunConfig):
    """Step 1: a UDA model (tllib recipe: SGD nesterov, lr 0.01, backbone x0.1, lr (1+0.001 it)^-0.75)."""

    method: str = "dann"  # "source-only" | "dann" | "cdan" | "mdd"
    iterations: int = 20000  # tllib: 20 epochs x 1000 iterations (step 2, RobustifyConfig: 10,000)
    arch: str = "digits_cnn"  # backbone: digits_cnn | resnet18 | resnet50
    backbone_weights: str = ""  # local file of pretrained backbone weights ("" = random init)
    bottleneck_dim: int | None = field(  # None: tllib's for the method, 256 (1024 for MDD)
        default=None, metadata={"help": "(default: the method's, as tllib: 256, or 1024 for mdd)"})
    classifier: str | None = field(  # None: the method's, as tllib: "mdd" for MDD, "standard" otherwise
        default=None, metadata={"help": "standard: bottleneck (Linear-BN-ReLU) and a linear head; mdd: tllib's MDD "
                                        "classifier, the bottleneck ends in dropout and the head is "
                                        "Linear-ReLU-Dropout-Linear (default: the method's, as tllib)"})
    trade_off: float = 1.0
    entropy_conditioning: bool = False  # CDAN+E
    randomized: bool = False  # CDAN's randomized multilinear map (tllib --randomized), for classes x features > 4096
    randomized_dim: int = 1024  # the randomized map's output width
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

    def __post_init__(self):
        if self.bottleneck_dim is None:  # resolved here, so a run's saved config holds the width it built
            self.bottleneck_dim = 1024 if self.method == "mdd" else 256
        if self.classifier is None:
            self.classifier = "mdd" if self.method == "mdd" else "standard"


@dataclass
class RobustifyConfig(RunConfig):
    """Step 2: disentangled distillation of the frozen UDA teacher into a student on unlabelled target data."""

    teacher: str = ""  # the step-1 checkpoint (best.pt of `dart pretrain`)
    # "" = the data the teacher was trained on; its root, source and target too, unless given (a moved root)
    data: str = ""
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
    # "pixel" (eps in [0,1] units) | "normalized": eps and step in normalised units (the authors' code: give eps 0.1,
    # step 0.05; the defaults stay 8/255, 2/255), each channel clipped to the range its [0,1] pixels map to |
    # "code": as "normalized", but every value clipped to [0, 1] as the authors' advertorch attack does
    # (clip_min=0, clip_max=1 on normalised images): it raises every negative normalised value to 0, far beyond eps.
    attack_space: str = field(default="pixel", metadata={"help": (
        "pixel: eps and step in [0, 1] pixel units; normalized: in normalised units, each channel clipped to the "
        "range its pixels map to (the authors' budget: --attack-eps 0.1 --attack-alpha 0.05); code: as normalized, "
        "but clipped to [0, 1] as the authors' advertorch attack clips normalised images, which moves every "
        "negative normalised value far beyond eps (default: pixel)")})
    attack_eps: float = 8 / 255
    attack_alpha: float = 2 / 255
    attack_steps: int = 10
    attack_random_start: bool = False  # I-FGSM, as the authors' code
    forward: str = "split-bn"  # "split-bn": clean+adversarial in one forward, BN stats per batch | "separate"


def _check_run_config(cfg: RunConfig) -> None:
    check_device(cfg.device, "dart")
    check_ranges(cfg, "dart", non_negative=("num_workers", "stop_after"))
    check_choices(cfg, "dart", {"fold_batchnorm": ("auto", "on", "off")})
    if cfg.batch_size < 2:  # the bottleneck's BatchNorm trains on batch statistics, which one sample does not have
        raise ValueError(f"dart: batch_size must be >= 2 (the bottleneck's BatchNorm needs batch statistics in "
                         f"training), got {cfg.batch_size}")


def check_pretrain_config(cfg: PretrainConfig) -> None:
    """Values no run can mean (a negative lr or loss weight trains *away* from the task without a word) and options
    that would have no effect: errors before any work. The loop checks its own settings (LoopSettings) and the attacks
    their budgets."""
    from urda_fast.models import LAYOUTS
    from urda_fast.models.backbones import check_backbone_weights
    from urda_fast.uda import METHODS

    _check_run_config(cfg)
    check_ranges(cfg, "dart", positive=("lr", "margin", "vat_alpha", "vat_steps", "randomized_dim"),
                 fraction=("momentum",),
                 # bottleneck_dim 0: no bottleneck, the head on the backbone's features (tllib's ERM classifier)
                 non_negative=("weight_decay", "lr_gamma", "lr_decay", "trade_off", "bottleneck_dim"),
                 pixel_budget=("vat_eps", "vat_alpha"))
    if not 0 <= cfg.vat_threshold <= 1:  # a softmax confidence: above 1 no pseudo-label would ever pass
        raise ValueError(f"dart: vat_threshold must be in [0, 1] (a confidence), got {cfg.vat_threshold}")
    if cfg.method not in METHODS:
        raise ValueError(f"dart: unknown UDA method {cfg.method!r}; choose one of {', '.join(sorted(METHODS))}")
    check_choices(cfg, "dart", {"classifier": LAYOUTS})
    if cfg.classifier == "mdd" and cfg.bottleneck_dim == 0:
        raise ValueError("dart: the mdd classifier layout needs a bottleneck (--bottleneck-dim > 0); 0 (no "
                         "bottleneck) is for the standard layout")
    if cfg.vat_target and not cfg.vat:
        raise ValueError("dart: vat_target adds adversarial pseudo-labelled target batches to the UDA+VAT baseline: "
                         "it needs --vat too")
    unused = {}
    if not cfg.vat:
        unused.update(dict.fromkeys(("vat_eps", "vat_alpha", "vat_steps"),
                                    "the UDA+VAT baseline's attack options need --vat"))
    if not cfg.vat_target:
        unused["vat_threshold"] = "the pseudo-label confidence of --vat-target's target batches needs --vat-target"
    if cfg.method != "mdd":
        unused["margin"] = f"it is MDD's margin (--method mdd), not {cfg.method}'s"
    if cfg.method == "source-only":
        unused["trade_off"] = "source-only has no transfer loss to weigh"
    if not cfg.randomized:
        unused["randomized_dim"] = "it is the width of CDAN's randomized map, which needs --randomized"
    warn_unused(cfg, "dart", unused)
    for name, what in (("entropy_conditioning", "CDAN+E"), ("randomized", "the randomized multilinear map")):
        if getattr(cfg, name) and cfg.method != "cdan":
            raise ValueError(f"dart: {name} is CDAN's option ({what}): it needs --method cdan, not {cfg.method!r}")
    check_backbone_weights(cfg.arch, cfg.backbone_weights or None)


def check_robustify_config(cfg: RobustifyConfig) -> None:
    from urda_fast.ops.kd_kl import check_temperature_range

    _check_run_config(cfg)
    for name in ("tau_robust", "tau_transfer"):  # kd_kl_loss's range, checked before any work
        check_temperature_range(getattr(cfg, name), name, "dart")
    check_ranges(cfg, "dart", positive=("lr", "tau_robust", "tau_transfer", "attack_eps", "attack_alpha",
                                        "attack_steps"),
                 fraction=("momentum",),
                 non_negative=("weight_decay", "lr_gamma", "lr_decay", "kl_weight", "feature_weight"))
    check_choices(cfg, "dart", {"forward": ("split-bn", "separate"), "weighting": ("per-sample", "code"),
                                "student_init": ("teacher", "backbone"),
                                "attack_space": ATTACK_SPACES})
    if cfg.kl_weight == 0 and cfg.feature_weight == 0:
        raise ValueError("dart: kl_weight and feature_weight are both 0: the loss would be 0 at every step and the "
                         "student would never move; give one of them a weight > 0")
    if cfg.attack_space == "pixel":
        check_ranges(cfg, "dart", pixel_budget=("attack_eps", "attack_alpha"))
    if cfg.backbone_weights and cfg.student_init != "backbone":
        raise ValueError("dart: backbone_weights are the fresh student's backbone with --student-init backbone; "
                         f"with student_init {cfg.student_init!r} the student starts from the teacher and would "
                         "ignore them")
