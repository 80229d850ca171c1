"""The data of a DART task: labelled source, unlabelled target (train), labelled target (test), and the resumable
training streams over them."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from urda_fast.data import DATASETS, default_transforms, open_domain

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# --data names on the command line -> the registry's benchmark names
DATA_NAMES = {"office31": "Office31", "officehome": "OfficeHome", "visda": "VisDA2017", "visda2017": "VisDA2017",
              "digits-files": "Digits"}


@dataclass
class TaskData:
    source_train: Dataset
    target_train: Dataset
    target_test: Dataset
    num_classes: int
    mean: tuple
    std: tuple
    description: str


def task_data(cfg) -> TaskData:
    """The embedded printed->handwritten digits (``cfg.data == "digits"``), or a real benchmark from ``cfg.root``."""
    if cfg.data == "digits":
        from urda_fast.data.digits import DOMAINS, load_digits_shift

        _check_embedded_digits_flags(cfg, DOMAINS)
        shift = load_digits_shift(seed=0)
        return TaskData(shift.source_train, shift.target_train, shift.target_test, shift.num_classes, (0.5,), (0.5,),
                        shift.describe())
    if cfg.data not in DATA_NAMES:
        raise ValueError(f"dart: unknown --data {cfg.data!r}; choose digits (embedded) or {', '.join(DATA_NAMES)}")
    name = DATA_NAMES[cfg.data]
    if not cfg.root:
        raise ValueError(f"dart: --data {cfg.data} needs --root, the folder that holds the dataset")
    if not cfg.source or not cfg.target:
        raise ValueError(f"dart: --data {cfg.data} needs -s/--source and -t/--target, from "
                         f"{', '.join(DATASETS[name].lists)}")
    train_tf, test_tf = default_transforms(name)
    source = open_domain(name, cfg.root, cfg.source, "train", train_tf)
    target = open_domain(name, cfg.root, cfg.target, "train", train_tf)
    test = open_domain(name, cfg.root, cfg.target, "test", test_tf)
    mean, std = ((0.5,), (0.5,)) if DATASETS[name].mode == "L" else (IMAGENET_MEAN, IMAGENET_STD)
    return TaskData(source, target, test, DATASETS[name].num_classes, mean, std,
                    f"{name}: {cfg.source} -> {cfg.target} from {cfg.root}")


def _check_embedded_digits_flags(cfg, domains) -> None:
    """The embedded task reads no files and has one fixed pair of domains: a --root, -s or -t meant for a real
    benchmark (say MNIST -> USPS) must not fall back to it without a word."""
    source, target = domains
    wrong = [f"--root {cfg.root!r}"] if cfg.root else []
    wrong += [f"-s {cfg.source!r}"] if cfg.source not in ("", source) else []
    wrong += [f"-t {cfg.target!r}"] if cfg.target not in ("", target) else []
    if wrong:
        raise ValueError(f"dart: --data digits is the embedded {source} -> {target} task, which "
                         f"takes no {', '.join(wrong)}; for digit benchmarks from files use --data digits-files "
                         "--root DIR -s MNIST -t USPS (or SVHN), for the others --data office31|officehome|visda")
