"""HPT-GPD configurations: the authors' code values as defaults (shared methods.md §2); (choice) marks urda_fast's
readings where the code and the paper leave a value open."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from urda_fast.config import OVERWRITE_HELP, RESUME_HELP

METHODS = ("tecoa", "pmg-aft", "hpt", "hpt-gpd")
LOGIT_SCALE_MAX = math.log(100.0)  # the code clamps logit_scale to <= ln(100) = 4.6052 after every step


@dataclass
class ModelsConfig:
    """Which CLIPs, and how their zero-shot heads see images and text."""

    target: str = ""  # "ARCH:CHECKPOINT", the CLIP to robustify (code: OpenAI ViT-B/32: ViT-B-32-quickgelu)
    proxy: str = ""  # "ARCH:CHECKPOINT", a frozen CLIP of another architecture (code: ViT-B-16-quickgelu)
    anchor: str = ""  # "ARCH:CHECKPOINT" of the frozen anchor; "" = the target's own starting weights
    logits: str = "cosine"  # "cosine": cosine similarities, no scale (code) | "clip": x exp(logit_scale)
    preprocess: str = "imagenet"  # "imagenet": ImageNet mean/std (code) | "clip": CLIP's mean/std
    templates: str = "This is a photo of a {}"  # zero-shot prompt(s), "|"-separated; {} = the class name
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" ...


@dataclass
class DataConfig:
    """Training data (labelled images) and the zero-shot sets watched during training."""

    train_data: str = "tinyimagenet"  # "tinyimagenet" (PMG-AFT protocol) | "imagefolder" | "world" (embedded, offline)
    root: str = ""  # dataset root (tinyimagenet: the folder holding tiny-imagenet-200/, or tiny-imagenet-200 itself)
    world: str = ""  # folder of the embedded world (`hpt demo` builds it); "" = the default cache folder
    # zero-shot sets evaluated during training, comma-separated ("" = the world's sets, TinyImageNet's val split, or
    # an imagefolder's own training images); prompted as `hpt eval --prompts code` does. The HPT code (9fb0669)
    # selects on cifar10's robust accuracy; its later commit watches dtd.
    val_data: str = ""
    image_size: int = 224  # images are resized to this for real datasets (the model resizes again if it differs)
    num_workers: int = 4


@dataclass
class TrainConfig(ModelsConfig, DataConfig):
    """One robust fine-tuning run: ``method`` picks the loss; GPD's two phases come from the lr schedule."""

    method: str = "hpt-gpd"  # "tecoa" | "pmg-aft" | "hpt" (HPT loss, plain warm-up) | "hpt-gpd"
    # "all" parameters (the HPT-GPD code) | "visual" tower only | "last:N": the last N parameter tensors of the visual
    # tower (the code's --last_num_ft N). With the text tower frozen its features are cached. None: each method's
    # code's, "visual" for tecoa and pmg-aft (the PMG-AFT code, which also runs TeCoA, fine-tunes model.visual),
    # "all" for hpt and hpt-gpd.
    trainable: str | None = field(default=None, metadata={
        "help": "all | visual | last:N (default: the method's code's: visual for tecoa and pmg-aft, all for hpt and "
                "hpt-gpd)"})
    out: str = "runs/hpt"
    epochs: int = 10
    iterations: int = 0  # 0 = epochs x batches per epoch
    batch_size: int = 256
    lr: float = 5e-5  # peak lr of the HPT phase
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_steps: int = 1000  # GPD phase (a): linear warm-up, then phase (b): cosine decay to 0
    warmup_lr: float = 0.0  # peak lr of the warm-up ramp; 0 = lr (code: one ramp to lr)
    # Loss weights per phase. HPT (code v1): 1 x KL(proxy(x_adv) || target(x_adv)) + 0.001 x KL(anchor(x) || ...).
    proxy_weight: float = 1.0
    anchor_weight: float = 0.001
    # GPD warm-up (choice; unpublished): pulled to the anchor's clean predictions only. `hpt` ignores these and
    # keeps the HPT weights through its warm-up, as the code does.
    warmup_proxy_weight: float = 0.0
    warmup_anchor_weight: float = 1.0
    pmg_original_weight: float = 1.0  # PMG-AFT: KL(original(x_adv) || target(x_adv))
    pmg_clean_weight: float = 1.0  # PMG-AFT: KL(target(x) || target(x_adv))
    pmg_kl_direction: str = field(default="paper", metadata={"help": (
        "paper: PMG-AFT's KL(original(x_adv) || target(x_adv)) and KL(target(x) || target(x_adv)) (methods.md); "
        "code: KL(target(x_adv) || original(x_adv)) and KL(target(x_adv) || target(x)), as the PMG-AFT code's "
        "KLDivLoss computes them (nearly the same gradient with cosine logits) (default: paper)")})
    kl_reduction: str = "sum"  # "sum" over the batch (code: KLDivLoss(reduction="sum")) | "batchmean"
    attack_eps: float = 2 / 255
    attack_alpha: float = 1 / 255
    attack_steps: int = 5
    attack_random_start: bool = True
    logit_scale_max: float = LOGIT_SCALE_MAX
    eval_every: int = 500
    eval_eps: float = 1 / 255
    eval_alpha: float = 1 / 255  # the validation PGD's step (code: 1/255), as hpt eval's --alpha
    eval_steps: int = 10
    eval_max_batches: int = 4  # batches per val set at each evaluation (0 = all)
    select_metric: str = "robust_acc"  # best.pt keeps the highest value (code: mean robust accuracy)
    seed: int = 0
    amp: str = "auto"  # "auto": fp16 on CUDA (code: mixed precision), none on CPU | "none" | "bf16" | "fp16"
    # torch.compile the image towers of target, proxy and anchor (in place: the same modules and state dict). Costs a
    # compilation at the first steps (~35 s for the embedded world's tiny CLIPs on 2 CPU cores, cached on disk by
    # torch afterwards) and a float rounding different from eager's; the tiny world's CPU step gains 2-5% over the
    # fused eager one (bench/bench_hpt_step.py's ours_compile against ours, 2026-12-08).
    compile: bool = False
    nvtx: bool = False
    cudnn_benchmark: bool = True  # cuDNN times its convolution algorithms (GPU; off: the same ones in every process)
    tensorboard: bool = True
    resume: bool = field(default=False, metadata={"help": RESUME_HELP})
    overwrite: bool = field(default=False, metadata={"help": OVERWRITE_HELP})
    progress: bool = True
    stop_after: int = 0  # end the run after this iteration, as a kill would (resume tests); 0 = never

    def __post_init__(self):
        if self.trainable is None:  # resolved here, so a run's saved config holds what it trained
            self.trainable = "visual" if self.method in ("tecoa", "pmg-aft") else "all"



RUN_OWN = "(default: each run's own, as it was trained; a plain --target: {})"


@dataclass
class EvalConfig(ModelsConfig):
    """Zero-shot clean and robust accuracy over many datasets (code: PGD-10, eps 1/255, step 1/255).

    ``logits``, ``preprocess`` and ``templates`` left None (not given) take each run's own, from its checkpoint, so
    a run is evaluated with the head it was trained with; a plain ``--target`` CLIP gets ``ModelsConfig``'s
    defaults. A value given applies to every model. The report says which were used (``report["rows"][i]["head"]``).
    """

    logits: str | None = field(default=None, metadata={"help": RUN_OWN.format(ModelsConfig.logits)})
    preprocess: str | None = field(default=None, metadata={"help": RUN_OWN.format(ModelsConfig.preprocess)})
    templates: str | None = field(default=None, metadata={"help": RUN_OWN.format(repr(ModelsConfig.templates))})
    # comma-separated names (urda_fast.hpt.data.EVAL_DATASETS, imagenet, folder:PATH); "paper": the papers' 15 sets,
    # whose average the known figures are (a shorter list's average is not comparable to them)
    datasets: str = "cifar10,cifar100,stl10"
    amp: str = field(default="none", metadata={"help": (
        "precision of the evaluation, attack included: none (float32) | fp16 (the code's validate runs under fp16 "
        "autocast) | bf16 | auto (fp16 on CUDA, none on CPU) (default: none)")})
    prompts: str = field(default="code", metadata={"help": (
        "code: the PMG-AFT / HPT-GPD code's own prompts for the sets that have them (Food101, Pets, Flowers102, DTD, "
        "EuroSAT, Aircraft, Cars, Caltech101/256, PCAM; urda_fast/hpt/prompts.py), --templates for the others; "
        "template: --templates for every set (default: code)")})
    root: str = ""
    world: str = ""
    attack: str = "pgd10"  # "pgdK" | "cwK" (CW margin loss) | "autoattack" | "none"
    eps: float = 1 / 255
    alpha: float = 1 / 255
    batch_size: int = 256
    max_batches: int = 0  # per dataset; 0 = all
    image_size: int = 224
    num_workers: int = 4
    seed: int = 0
    out: str = ""  # folder for report.md/json/png ("" = print only)
    progress: bool = True


@dataclass
class ProxyCheckConfig(ModelsConfig):
    """White-box PGD accuracy of the target vs. the proxy's accuracy on the target's adversarial images."""

    data: str = "cifar10"
    root: str = ""
    world: str = ""
    eps: float = 1 / 255
    alpha: float = 1 / 255
    steps: int = 10
    batch_size: int = 256
    max_batches: int = 0
    image_size: int = 224
    num_workers: int = 4
    seed: int = 0
    out: str = ""
    progress: bool = True


def parse_trainable(value: str) -> tuple[str, int]:
    """``TrainConfig.trainable`` as ("all", 0), ("visual", 0) or ("last", N); a clear error for anything else."""
    if value in ("all", "visual"):
        return value, 0
    kind, _, count = value.partition(":")
    if kind == "last" and count.isdigit() and int(count) > 0:
        return "last", int(count)
    raise ValueError(f"hpt: trainable must be 'all', 'visual' or 'last:N' (N >= 1, the last N parameter tensors of "
                     f"the visual tower), got {value!r}")


def text_frozen(value: str) -> bool:
    """Whether ``trainable`` leaves the text tower frozen (its class features can then be cached)."""
    return parse_trainable(value)[0] != "all"
