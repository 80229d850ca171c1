"""Zero-shot datasets from local roots (torchvision classes with download=False, ImageFolder, TinyImageNet) and from
the embedded world, each with the class names its zero-shot head needs.

    zs = open_dataset("cifar10", root="~/data", image_size=224)          # ZeroShotSet(name, dataset, classnames)
    zs = open_dataset("world:handwritten", world=World(folder))
    zs = open_dataset("folder:/data/my_set/val")                          # ImageFolder; class names = folder names

Images come out as (3, H, W) tensors in [0, 1] (no Normalize: the zero-shot head normalises, attacks need pixels).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, TensorDataset

PCAM_CLASSES = ["lymph node", "lymph node containing metastatic tumor tissue"]


@dataclass
class ZeroShotSet:
    name: str
    dataset: Dataset
    classnames: list


def _tv(cls_name: str, **kwargs):
    def make(root, transform):
        import torchvision.datasets as D

        return getattr(D, cls_name)(root, transform=transform, download=False, **kwargs)

    return make


# name -> (constructor(root, transform), the layout torchvision expects under --root, for error messages)
EVAL_DATASETS = {
    "cifar10": (_tv("CIFAR10", train=False), "cifar-10-batches-py/"),
    "cifar100": (_tv("CIFAR100", train=False), "cifar-100-python/"),
    "stl10": (_tv("STL10", split="test"), "stl10_binary/"),
    "sun397": (_tv("SUN397"), "SUN397/"),
    "food101": (_tv("Food101", split="test"), "food-101/"),
    "pets": (_tv("OxfordIIITPet", split="test"), "oxford-iiit-pet/"),
    "flowers102": (_tv("Flowers102", split="test"), "flowers-102/"),
    "dtd": (_tv("DTD", split="test"), "dtd/"),
    "eurosat": (_tv("EuroSAT"), "eurosat/2750/<class>/"),
    "aircraft": (_tv("FGVCAircraft", split="test"), "fgvc-aircraft-2013b/"),
    "caltech101": (_tv("Caltech101", target_type="category"), "caltech101/101_ObjectCategories/"),
    "caltech256": (_tv("Caltech256"), "caltech256/256_ObjectCategories/"),
    "cars": (_tv("StanfordCars", split="test"), "stanford_cars/"),
    "pcam": (_tv("PCAM", split="test"), "pcam/*.h5"),
}
# datasets whose torchvision reader needs a package urda_fast does not depend on: name -> (package, pip extra)
NEEDS_PACKAGE = {"pcam": ("h5py", "pcam")}
ALIASES = {"oxfordpet": "pets", "fgvc_aircraft": "aircraft", "stanfordcars": "cars", "flowers": "flowers102"}


def refine_classname(name: str) -> str:
    """'001.ak47' / 'Abyssinian' / 'golden_retriever' -> 'ak47' / 'abyssinian' / 'golden retriever' (the code's)."""
    name = re.sub(r"^\d+\.", "", str(name))
    return name.lower().replace("_", " ").replace("-", " ").strip()


def distinct_classnames(name: str, raw, what: str) -> list:
    """``refine_classname`` of each of ``raw``; a ValueError naming the ``raw`` names that become the same prompt
    ('Cat' and 'cat', 'big_cat' and 'big-cat'): of classes with identical text features, only the first could ever
    be predicted."""
    refined = [refine_classname(c) for c in raw]
    groups = {}
    for original, clean in zip(raw, refined):
        groups.setdefault(clean, []).append(original)
    clashes = [f"{' and '.join(map(repr, group))} -> {clean!r}" for clean, group in groups.items() if len(group) > 1]
    if clashes:
        raise ValueError(f"hpt: {name}: {what} {'; '.join(clashes[:5])}{'; ...' if len(clashes) > 5 else ''} give the "
                         "same zero-shot class name (lower-cased, '_' and '-' as spaces, a leading 'NNN.' dropped): "
                         "identical prompts, so one of each could never be predicted; rename or merge them")
    return refined


def eval_transform(image_size: int):
    """Resize the short side, centre-crop, RGB, ToTensor: (3, size, size) in [0, 1]."""
    import torchvision.transforms as T

    return T.Compose([T.Lambda(lambda img: img.convert("RGB")), T.Resize(image_size), T.CenterCrop(image_size),
                      T.ToTensor()])


def _classnames_of(name, dataset):
    if name == "pcam":
        return list(PCAM_CLASSES)
    if name == "imagenet":
        return [refine_classname(c[0] if isinstance(c, (tuple, list)) else c) for c in dataset.classes]
    names = getattr(dataset, "classes", None) or getattr(dataset, "categories", None)
    if not names:
        raise ValueError(f"hpt: {name}: the dataset has no class names (classes/categories) for its zero-shot head")
    return [refine_classname(c) for c in names]


def tinyimagenet(root: str, transform=None) -> ZeroShotSet:
    """TinyImageNet's training split: ``<root>/tiny-imagenet-200/train/<wnid>/images/*.JPEG`` (or root = the
    tiny-imagenet-200 folder), class names from ``words.txt`` (first synonym)."""
    from torchvision.datasets import ImageFolder

    base = root if os.path.isdir(os.path.join(root, "train")) else os.path.join(root, "tiny-imagenet-200")
    train, words = os.path.join(base, "train"), os.path.join(base, "words.txt")
    if not (os.path.isdir(train) and os.path.isfile(words)):
        raise FileNotFoundError(f"hpt: TinyImageNet not found under {root!r}: expected "
                                f"{os.path.join(root, 'tiny-imagenet-200')}/train/<wnid>/images/*.JPEG and words.txt "
                                "(the unpacked tiny-imagenet-200.zip)")
    with open(words) as f:
        names = dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)
    dataset = ImageFolder(train, transform=transform)
    missing = [w for w in dataset.classes if w not in names]
    if missing:
        raise ValueError(f"hpt: {words} has no name for class folder(s) {missing[:3]}; is it TinyImageNet's words.txt?")
    return ZeroShotSet("tinyimagenet", dataset, [refine_classname(names[w].split(",")[0]) for w in dataset.classes])


def open_dataset(name: str, root: str = "", image_size: int = 224, world=None) -> ZeroShotSet:
    """A zero-shot set by name: an ``EVAL_DATASETS`` key, ``imagenet``, ``tinyimagenet``, ``folder:PATH`` or
    ``world:SPLIT`` (needs ``world``). Missing or mis-laid files raise FileNotFoundError naming the layout."""
    name = ALIASES.get(name.strip().lower(), name.strip().lower()) if not name.startswith(("folder:", "world:")) \
        else name.strip()
    if name.startswith("world:"):
        if world is None:
            raise ValueError(f"hpt: {name} is a split of the embedded world; give --world (or run `hpt demo`)")
        split = name[len("world:"):]
        images, labels = world.split(split)
        return ZeroShotSet(name, TensorDataset(images, labels), world.classnames(split))
    transform = eval_transform(image_size)
    if name.startswith("folder:"):
        from torchvision.datasets import ImageFolder

        path = os.path.expanduser(name[len("folder:"):])
        if not os.path.isdir(path):
            raise FileNotFoundError(f"hpt: {name}: folder {path!r} not found (expected {path}/<class>/<image>)")
        dataset = ImageFolder(path, transform=transform)
        return ZeroShotSet(name, dataset, distinct_classnames(name, dataset.classes, "class folders"))
    if name == "tinyimagenet":
        zs = tinyimagenet(os.path.expanduser(root), transform)
        return zs
    if not root:
        raise ValueError(f"hpt: dataset {name!r} needs --root, the folder holding it")
    root = os.path.expanduser(root)
    if name == "imagenet":
        import torchvision.datasets as D

        make, layout = (lambda r, tf: D.ImageNet(r, split="val", transform=tf)), "ILSVRC2012_devkit_t12.tar.gz, val/"
    elif name in EVAL_DATASETS:
        make, layout = EVAL_DATASETS[name]
    else:
        raise ValueError(f"hpt: unknown dataset {name!r}; choose from {', '.join(EVAL_DATASETS)}, imagenet, "
                         "tinyimagenet, folder:PATH, world:SPLIT")
    if name in NEEDS_PACKAGE:
        package, extra = NEEDS_PACKAGE[name]
        try:
            __import__(package)
        except ImportError as err:  # torchvision's own message would come after "not found under --root"
            raise ImportError(f"hpt: {name} needs the {package} package, which is not installed: pip install "
                              f"{package} (or pip install 'urda_fast[{extra}]')") from err
    try:
        dataset = make(root, transform)
    except (RuntimeError, FileNotFoundError, OSError) as err:
        # torchvision says "Dataset not found or corrupted. You can use download=True": say where it looked instead
        # (and keep its own words only when they say something else).
        detail = "" if "download=True" in str(err) else f": {err}"
        raise FileNotFoundError(f"hpt: {name} not found under {root!r} (expected {os.path.join(root, layout)}, the "
                                f"layout torchvision's download creates; nothing is downloaded here){detail}") from err
    return ZeroShotSet(name, dataset, _classnames_of(name, dataset))


def subset(dataset: Dataset, count: int, seed: int = 0) -> Dataset:
    """A fixed random subset of ``count`` samples (all when count <= 0 or >= len)."""
    if count <= 0 or count >= len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return torch.utils.data.Subset(dataset, idx.tolist())


def loader_workers(dataset: Dataset, requested: int) -> int:
    """``requested`` DataLoader workers, or 0 for in-memory tensors (worker start-up would cost more than it saves)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return 0 if isinstance(dataset, TensorDataset) else requested
