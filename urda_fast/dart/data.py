"""The data of a DART task: labelled source, unlabelled target (train), labelled target (test), and the resumable
training streams over them."""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass

from torch.utils.data import Dataset

from urda_fast.data import DATASETS, default_transforms, open_domain
from urda_fast.files import run_checkpoint

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# --data names on the command line -> the registry's benchmark names
DATA_NAMES = {"office31": "Office31", "officehome": "OfficeHome", "visda": "VisDA2017", "visda2017": "VisDA2017",
              "digits-files": "Digits"}
DATA_FIELDS = ("data", "root", "source", "target")  # what says which data a run read
SPLITS = ("source_train", "target_train", "target_test")


@dataclass
class TaskData:
    source_train: Dataset | None  # None: a split not asked for (task_data's ``splits``)
    target_train: Dataset | None
    target_test: Dataset | None
    num_classes: int
    mean: tuple
    std: tuple
    description: str


def task_data(cfg, splits=SPLITS) -> TaskData:
    """The embedded printed->handwritten digits (``cfg.data == "digits"``), or a real benchmark from ``cfg.root``.

    ``splits``: which of ``SPLITS`` to open from files (the others are None): DART step 2 reads no source, `dart eval`
    only the target's test split, so neither needs a source domain (-s)."""
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"dart: unknown split(s) {sorted(unknown)}; choose from {', '.join(SPLITS)}")
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
    needs_source = "source_train" in splits
    if not cfg.target or (needs_source and not cfg.source):
        raise ValueError(f"dart: --data {cfg.data} needs {'-s/--source and ' if needs_source else ''}-t/--target, "
                         f"from {', '.join(DATASETS[name].domains)}")
    spec = DATASETS[name]
    for flag, domain in (("-s", cfg.source), ("-t", cfg.target)):
        if domain and domain not in spec.domains:
            raise ValueError(f"dart: {name} has domains {', '.join(spec.domains)}, not {flag} {domain!r}")
    mode, size = spec.read_as(cfg.target)
    if needs_source and spec.read_as(cfg.source) != (mode, size):
        raise ValueError(f"dart: -s {cfg.source} is read as {_format(spec, cfg.source)} but -t {cfg.target} as "
                         f"{_format(spec, cfg.target)}: one model takes one kind of image; pick domains read alike "
                         f"(tllib's SVHN -> MNIST recipe: -s SVHNRGB -t MNISTRGB)")
    train_tf, test_tf = default_transforms(name, cfg.target)
    opened = {split: open_domain(name, cfg.root, cfg.source if split == "source_train" else cfg.target,
                                 split.split("_")[1], train_tf if split.endswith("train") else test_tf)
              for split in SPLITS if split in splits}
    channels = 1 if mode == "L" else 3
    mean, std = ((spec.mean,) * channels, (spec.std,) * channels) if spec.mean is not None else \
        (IMAGENET_MEAN, IMAGENET_STD)
    shift = f"{cfg.source} -> {cfg.target}" if cfg.source else f"target {cfg.target}"
    return TaskData(*(opened.get(split) for split in SPLITS), DATASETS[name].num_classes, mean, std,
                    f"{name}: {shift} from {cfg.root}")


def _format(spec, domain: str) -> str:
    mode, size = spec.read_as(domain)
    crop = f" (crops of {spec.crop_size})" if spec.crop_size else ""
    return f"{'greyscale' if mode == 'L' else mode} at {size}x{size}{crop}"


def absolute_root(cfg):
    """``cfg`` (a copy) with its dataset root absolute (``~`` expanded): a run saves its config, and `dart eval` or a
    DART step from the run read that root from wherever they are started."""
    if not cfg.root or cfg.data == "digits":  # the embedded digits refuse a root, in the user's words
        return cfg
    return dataclasses.replace(cfg, root=os.path.abspath(os.path.expanduser(cfg.root)))


def _same_dataset(a: str, b: str) -> bool:
    return DATA_NAMES.get(a, a) == DATA_NAMES.get(b, b)


def saved_root(saved: dict, run: str, who: str) -> str:
    """The dataset root a run's config ``saved`` names, absolute, or a FileNotFoundError that says to give --root (a
    moved dataset). Runs save it absolute; an older run's relative root was relative to the folder it was started in:
    the folder this is run from, or (found from the run's own relative --out) the one that holds the run's --out."""
    root = os.path.expanduser(saved.get("root") or "")
    if not root:
        return root
    candidates = [os.path.abspath(root)]
    out, folder = saved.get("out") or "", os.path.dirname(os.path.abspath(run_checkpoint(run)))
    if not os.path.isabs(root) and out and not os.path.isabs(out):
        out = os.path.normpath(out)
        if folder.endswith(os.sep + out):
            candidates.append(os.path.join(folder[: -len(out)], root))
    for path in candidates:
        if os.path.isdir(path):
            return path
    where = " nor ".join(map(repr, dict.fromkeys(candidates)))
    raise FileNotFoundError(f"{who}: {run_checkpoint(run)!r} was trained on the dataset root {saved['root']!r}, "
                            f"which is not there now ({where} does not exist): give --root, where the dataset is")


def run_data(saved: dict, given: dict, run: str, who: str) -> dict:
    """The data fields (``DATA_FIELDS``) to read for a run whose config is ``saved`` (a teacher, or a run to evaluate):
    its own, each one overridden by ``given`` where given (None or "" = not given; a moved root, another target).
    Another --data than the run's takes none of the run's root and domains (they name another dataset's)."""
    given = {k: v for k, v in given.items() if k in DATA_FIELDS and v not in (None, "")}
    saved_data = saved.get("data") or "digits"  # a run saves its data; "digits" was every run's default
    data = given.get("data", saved_data)
    if not _same_dataset(data, saved_data):
        return {"data": data, **{k: given.get(k, "") for k in DATA_FIELDS[1:]}}
    return {"data": data, "root": given["root"] if "root" in given else saved_root(saved, run, who),
            **{k: given.get(k, saved.get(k) or "") for k in ("source", "target")}}


def target_key(data: str, target: str) -> tuple:
    """(dataset, target domain) a run reads its target from, aliases resolved; the embedded digits have one (fixed)
    target domain."""
    return (DATA_NAMES.get(data, data), "" if data == "digits" else target)


def with_teacher_data(cfg, saved: dict):
    """``cfg`` (a copy) reading the data its teacher was trained on (``saved``: the teacher's config) where it gives
    none, each of --data, --root, -s, -t overriding its saved value; a warning when it names another dataset or target
    domain than the teacher's (DART distils the teacher on the target domain it was adapted to)."""
    fields = run_data(saved, {k: getattr(cfg, k) for k in DATA_FIELDS}, cfg.teacher, "dart")
    theirs = saved.get("data") or "digits", saved.get("target") or ""
    if target_key(*theirs) != target_key(fields["data"], fields["target"]):
        words = [f"--data {data}" + (f" -t {target}" if target and data != "digits" else "")
                 for data, target in (theirs, (fields["data"], fields["target"]))]
        warnings.warn(f"dart: the teacher {run_checkpoint(cfg.teacher)!r} was trained on {words[0]}, and this run "
                      f"reads {words[1]}: DART distils the teacher on the target domain it was adapted to; leave out "
                      "--data (and -t) to read the teacher's", stacklevel=3)
    return dataclasses.replace(cfg, **fields)


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
