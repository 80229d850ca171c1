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
import warnings
from dataclasses import dataclass

from torch.utils.data import Dataset, TensorDataset

from urda_fast.config import repeated
from urda_fast.data.domains import pil_loader

from .prompts import code_prompts

PCAM_CLASSES = ["lymph node", "lymph node containing metastatic tumor tissue"]


@dataclass
class ZeroShotSet:
    name: str
    dataset: Dataset
    classnames: list
    prompts: list | None = None  # the PMG-AFT / HPT-GPD code's prompt per class (.prompts), where it has its own


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
# The 15 zero-shot sets of the papers' protocol (methods.md), in their order: `hpt eval --datasets paper`.
PAPER_DATASETS = ("cifar10", "cifar100", "stl10", "sun397", "food101", "pets", "flowers102", "dtd", "eurosat",
                  "aircraft", "imagenet", "caltech101", "caltech256", "cars", "pcam")
# datasets whose torchvision reader needs a package urda_fast does not depend on: name -> (package, pip extra)
NEEDS_PACKAGE = {"pcam": ("h5py", "pcam")}
ALIASES = {"oxfordpet": "pets", "fgvc_aircraft": "aircraft", "stanfordcars": "cars", "flowers": "flowers102"}


def refine_classname(name: str) -> str:
    """'001.ak47' / 'Abyssinian' / 'golden_retriever' / 'apartment_building/outdoor' -> 'ak47' / 'abyssinian' /
    'golden retriever' / 'apartment building outdoor' (the code's '_', '-', '/' as spaces)."""
    name = re.sub(r"^\d+\.", "", str(name))
    return name.lower().replace("_", " ").replace("-", " ").replace("/", " ").strip()


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
                         "same zero-shot class name (lower-cased, '_', '-' and '/' as spaces, a leading 'NNN.' "
                         "dropped): identical prompts, so one of each could never be predicted; rename or merge them")
    return refined


# Sets the PMG-AFT / HPT-GPD code reads at their own resolution (ToTensor only): the zero-shot head resizes them for
# the model, inside the attacked function, so the eps-ball lives at 32x32 / 96x96 as in the papers' figures.
NATIVE_RESOLUTION = ("cifar10", "cifar100", "stl10")


def _to_rgb(image):
    return image.convert("RGB")


def eval_transform(image_size: int, native: bool = False):
    """RGB, ToTensor, in [0, 1]: at the image's own resolution (``native``), else the code's ImageNet-style
    Resize(size * 256 / 224) of the short side and CenterCrop(size) (224: Resize(256), CenterCrop(224))."""
    import torchvision.transforms as T

    rgb = T.Lambda(_to_rgb)  # a module-level function: loader workers started by spawn / forkserver pickle it
    if native:
        return T.Compose([rgb, T.ToTensor()])
    return T.Compose([rgb, T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor()])


# WordNet synsets whose synonyms are all another class's first one too (ImageNet's two "crane"s): the names CLIP's
# curated ImageNet list gives them.
WORDNET_NAME_FIXES = {"n02012849": "crane bird", "n03126707": "construction crane"}


def wordnet_classnames(name: str, wnids, synonyms) -> list:
    """Zero-shot class names of WordNet classes (ImageNet, TinyImageNet): each class's first synonym, refined; a class
    whose first synonym another class has too takes its first synonym that no class has first (ImageNet's 'maillot'
    and 'maillot, tank suit' -> 'maillot' and 'tank suit'), or its WORDNET_NAME_FIXES name. Identical prompts left
    after that (another devkit's synsets) are a warning: one of each could never be predicted, but a fixed benchmark
    cannot be renamed."""
    first = [refine_classname(syns[0]) for syns in synonyms]
    taken = set(first)
    counts = {n: first.count(n) for n in taken}
    names = []
    for wnid, syns, own in zip(wnids, synonyms, first):
        if counts[own] > 1:
            if wnid in WORDNET_NAME_FIXES:
                own = WORDNET_NAME_FIXES[wnid]
            else:
                own = next((refine_classname(s) for s in syns[1:] if refine_classname(s) not in taken), own)
            taken.add(own)
        names.append(own)
    clashes = repeated(names)
    if clashes:
        warnings.warn(f"hpt: {name}: classes share the zero-shot names {clashes[:5]}: of each, only the first can be "
                      "predicted", stacklevel=2)
    return names


def _raw_classnames(dataset):
    return getattr(dataset, "classes", None) or getattr(dataset, "categories", None)


def _classnames_of(name, dataset):
    if name == "pcam":
        return list(PCAM_CLASSES)
    if name == "imagenet":
        return wordnet_classnames(name, dataset.wnids, [c if isinstance(c, (tuple, list)) else (c,)
                                                        for c in dataset.classes])
    names = _raw_classnames(dataset)
    if not names:
        raise ValueError(f"hpt: {name}: the dataset has no class names (classes/categories) for its zero-shot head")
    return [refine_classname(c) for c in names]


class ListedImages(Dataset):
    """Image files with their labels from a list rather than from class folders; ``classes`` as an ImageFolder's."""

    def __init__(self, samples, classes, transform=None):
        self.samples, self.classes, self.transform = samples, classes, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        image = pil_loader(path, "RGB")  # an unreadable file: one line naming it, as in DART's image lists
        return (self.transform(image) if self.transform is not None else image), label


TINYIMAGENET_SPLITS = ("train", "val")


def tinyimagenet(root: str, transform=None, split: str = "train") -> ZeroShotSet:
    """TinyImageNet from ``<root>/tiny-imagenet-200`` (or root = that folder), class names from ``words.txt`` (first
    synonym). ``train``: ``train/<wnid>/images/*.JPEG``; ``val``: ``val/images/*.JPEG`` labelled by
    ``val/val_annotations.txt`` (no class folders: an ImageFolder would see one class, ``images``), with the training
    split's class indices."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import find_classes

    if split not in TINYIMAGENET_SPLITS:
        raise ValueError(f"hpt: TinyImageNet split must be one of {TINYIMAGENET_SPLITS}, got {split!r} (its test "
                         "split has no labels)")
    # root may be the unpacked folder itself or hold it beside other sets (ImageNet's train/ among them)
    nested = os.path.join(root, "tiny-imagenet-200")
    base = nested if os.path.isdir(nested) or not os.path.isfile(os.path.join(root, "words.txt")) else root
    train, words = os.path.join(base, "train"), os.path.join(base, "words.txt")
    if not (os.path.isdir(train) and os.path.isfile(words)):
        raise FileNotFoundError(f"hpt: TinyImageNet not found under {root!r}: expected "
                                f"{os.path.join(root, 'tiny-imagenet-200')}/train/<wnid>/images/*.JPEG and words.txt "
                                "(the unpacked tiny-imagenet-200.zip)")
    with open(words) as f:
        names = dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)
    if split == "train":
        dataset = ImageFolder(train, transform=transform, loader=_rgb_loader)
    else:
        classes, index = find_classes(train)  # the training split's order: a run's head scores both alike
        annotations = os.path.join(base, "val", "val_annotations.txt")
        if not os.path.isfile(annotations):
            raise FileNotFoundError(f"hpt: TinyImageNet's val split not found: expected {annotations} and "
                                    f"{os.path.join(base, 'val', 'images')}/*.JPEG (the unpacked "
                                    "tiny-imagenet-200.zip)")
        with open(annotations) as f:
            rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
        short = next((i for i, row in enumerate(rows, 1) if len(row) < 2), None)
        if not rows or short is not None:
            what = "lists no images" if not rows else f"entry {short} has no class"
            raise ValueError(f"hpt: {annotations} {what}: expected tab-separated lines "
                             "'val_0.JPEG<TAB>n03444034<TAB>...' (TinyImageNet's own file)")
        unknown = sorted({row[1] for row in rows if row[1] not in index})
        if unknown:
            raise ValueError(f"hpt: {annotations} labels images with class(es) {unknown[:3]} that {train} has no "
                             "folder for; are train/ and val/ from the same tiny-imagenet-200?")
        dataset = ListedImages(_tinyimagenet_val_samples(base, rows, index), classes, transform)
    missing = [w for w in dataset.classes if w not in names]
    if missing:
        raise ValueError(f"hpt: {words} has no name for class folder(s) {missing[:3]}; is it TinyImageNet's words.txt?")
    return ZeroShotSet("tinyimagenet" if split == "train" else "tinyimagenet:val", dataset, wordnet_classnames(
        "tinyimagenet", dataset.classes, [[n.strip() for n in names[w].split(",")] for w in dataset.classes]))


def _tinyimagenet_val_samples(base, rows, index):
    """(path, label) of the annotated val images, as unpacked (val/images/) or sorted into class folders by the
    widely used script (val/<wnid>/images/ or val/<wnid>/); every file checked now, not at the first evaluation."""
    val = os.path.join(base, "val")
    layouts = [lambda file, wnid: os.path.join(val, "images", file),
               lambda file, wnid: os.path.join(val, wnid, "images", file),
               lambda file, wnid: os.path.join(val, wnid, file)]
    file, wnid = rows[0][0], rows[0][1]
    where = next((layout for layout in layouts if os.path.isfile(layout(file, wnid))), layouts[0])
    samples = [(where(row[0], row[1]), index[row[1]]) for row in rows]
    missing = [path for path, _ in samples if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"hpt: TinyImageNet's val split: {len(missing)} of the {len(samples)} images that "
                                f"val_annotations.txt lists are missing, e.g. {missing[0]!r} (expected "
                                f"{val}/images/<file>, or {val}/<wnid>/images/<file> or {val}/<wnid>/<file> when "
                                "sorted into class folders)")
    return samples


def _rgb_loader(path):
    return pil_loader(path, "RGB")  # an unreadable file: one line naming it, as in DART's image lists


def check_class_folders(name: str, classes) -> None:
    """A ValueError for an ImageFolder whose class folders cannot make a zero-shot head: one class (every image
    counts as right: 100% whatever the model), or WordNet ids, which would be the prompts' class names."""
    if len(classes) < 2:
        raise ValueError(f"hpt: {name}: {len(classes)} class folder(s) {list(classes)}: a zero-shot set needs at "
                         "least 2 (with one, every prediction is right); give the folder holding one folder per "
                         "class (TinyImageNet's val/ has none: use the dataset name tinyimagenet)")
    if all(re.fullmatch(r"n\d{8}", str(c)) for c in classes):
        raise ValueError(f"hpt: {name}: the class folders are WordNet ids ({', '.join(list(classes)[:3])}, ...), "
                         "which would be the zero-shot prompts' class names; use the dataset names imagenet or "
                         "tinyimagenet, which read their class names")


def canonical_name(name: str) -> str:
    """The name a set is opened and reported under: stripped, lower case (a folder's path keeps its case), aliases
    resolved, ``tinyimagenet`` as ``tinyimagenet:val`` (the split an evaluation reads)."""
    name = name.strip()
    prefix, colon, rest = name.partition(":")
    if colon and prefix.lower() in ("folder", "world"):
        return f"{prefix.lower()}:{rest.strip()}"
    name = ALIASES.get(name.lower(), name.lower())
    return "tinyimagenet:val" if name == "tinyimagenet" else name


def dataset_names(text: str, who: str) -> list:
    """The comma-separated sets of ``text`` as ``canonical_name``s, ``paper`` as the papers' 15; a set named twice
    (in any spelling) is an error: its column would repeat and the averages count it once."""
    names = [canonical_name(n) for n in text.split(",") if n.strip()]
    names = [name for n in names for name in (PAPER_DATASETS if n == "paper" else (n,))]
    twice = repeated(names)
    if twice:
        raise ValueError(f"{who}: datasets given more than once: {', '.join(twice)}")
    return names


def open_dataset(name: str, root: str = "", image_size: int = 224, world=None) -> ZeroShotSet:
    """A zero-shot set by name: an ``EVAL_DATASETS`` key, ``imagenet``, ``tinyimagenet`` (its val split),
    ``folder:PATH`` or ``world:SPLIT`` (needs ``world``). Missing or mis-laid files raise FileNotFoundError naming
    the layout."""
    name = canonical_name(name)
    if name.startswith("world:"):
        if world is None:
            raise ValueError(f"hpt: {name} is a split of the embedded world; give --world (or run `hpt demo`)")
        split = name[len("world:"):]
        images, labels = world.split(split)
        return ZeroShotSet(name, TensorDataset(images, labels), world.classnames(split))
    transform = eval_transform(image_size, native=name in NATIVE_RESOLUTION)
    if name.startswith("folder:"):
        from torchvision.datasets import ImageFolder

        path = os.path.expanduser(name[len("folder:"):])
        if not os.path.isdir(path):
            raise FileNotFoundError(f"hpt: {name}: folder {path!r} not found (expected {path}/<class>/<image>)")
        try:
            dataset = ImageFolder(path, transform=transform, loader=_rgb_loader)
        except FileNotFoundError as err:  # torchvision's "Couldn't find any class folder" / "Found no valid file"
            raise FileNotFoundError(f"hpt: {name}: {err} (expected {path}/<class>/<image>)") from None
        check_class_folders(name, dataset.classes)
        return ZeroShotSet(name, dataset, distinct_classnames(name, dataset.classes, "class folders"))
    if name == "tinyimagenet:val":  # an evaluation set: the labelled held-out split
        return tinyimagenet(os.path.expanduser(root), transform, split="val")
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
        folder = os.path.join(root, layout.split("/")[0])
        if detail == "" and "corrupted" in str(err) and os.path.isdir(folder):
            raise FileNotFoundError(f"hpt: {name}: {folder} is there, but torchvision found it incomplete or corrupted "
                                    "(its checksums or file list do not match: a partial download or extraction, or "
                                    "another release); extract the official archive again") from err
        raise FileNotFoundError(f"hpt: {name} not found under {root!r} (expected {os.path.join(root, layout)}, the "
                                f"layout torchvision's download creates; nothing is downloaded here){detail}") from err
    return ZeroShotSet(name, dataset, _classnames_of(name, dataset),
                       code_prompts(name, _raw_classnames(dataset) if name != "pcam" else PCAM_CLASSES))
