"""Real domain-adaptation datasets from local files (tllib's formats), their transforms, and resumable loaders.

Nothing is downloaded: a dataset is a folder you already have, in the Transfer-Learning-Library (tllib) layout -- an
image list ``<root>/image_list/<domain>.txt`` whose lines are ``relative/path.jpg <label>`` -- or, for the digits,
an ImageFolder tree ``<root>/<DOMAIN>/<split>/<class>/*.png``. ``open_domain(dataset, root, domain, split)`` picks
the file from the registry below and fails with the expected layout when it is missing.

Transforms follow tllib and stop at ``ToTensor``: no ``Normalize``, because the models normalise inside and attacks
need [0, 1] pixels.

Resuming bit-for-bit. ``make_loader(..., train=True)`` draws its order from a ``ResumableSampler``: epoch ``e`` is a
permutation made by a ``torch.Generator`` seeded from ``(seed, e)`` alone, so any epoch can be rebuilt without
replaying the ones before it, and the sampler can start an epoch at any position. The same generator also draws one
seed per sample, and the dataset wrapper runs each sample's transform under that seed (in a forked RNG, so the global
RNG is untouched): random crops and flips depend on (seed, epoch, position) only, not on which worker ran them or how
many batches came before. The loader gets its own ``torch.Generator`` too, so creating iterators never draws from the
global RNG. What was *consumed* is known only to the loop (workers prefetch ahead of it), so the checkpointable state
lives in ``ForeverDataIterator``: it counts the batches it handed out, and ``state_dict()`` returns
``{"epoch", "position"}`` of the next unseen sample; ``load_state_dict`` on a fresh loader continues with exactly the
batches (and augmentations) the uninterrupted run would have produced. Save it with the model, optimiser and
``torch.get_rng_state()`` in checkpoints.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from urda_fast import distributed
from urda_fast.files import reading_error

# ----------------------------------------------------------------------------------------------------------- datasets


class ImageReadError(ValueError):
    """An image file that PIL cannot read (corrupt, truncated, not an image): one line naming the file (and, for an
    image list, the list and line). A ValueError, so the command line reports it as bad input, not as a bug."""

    def __init__(self, message: str):
        # A DataLoader worker's error comes back as ImageReadError("Caught ImageReadError in DataLoader worker ...
        # <the worker's traceback>"), PIL's included: keep the one line it ends with.
        if message.startswith("Caught ImageReadError") and "ImageReadError: " in message:
            message = message.rsplit("ImageReadError: ", 1)[1].strip()
        super().__init__(message)


def pil_loader(path: str, mode: str = "RGB", where: str = ""):
    """The image at ``path`` in PIL ``mode``; an unreadable file is an :class:`ImageReadError` naming it (``where``:
    e.g. the image list that points at it), not PIL's traceback at the first batch that happens to hold it."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return _to_8_bit(Image.open(f), path, where).convert(mode)
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # UnidentifiedImageError: OSError
        why = "PIL does not recognise it as an image: corrupt, or another kind of file" if isinstance(
            err, Image.UnidentifiedImageError) else reading_error(err)
        raise ImageReadError(f"urda_fast: cannot read image {path!r}{where} ({why}); replace or remove the file") \
            from err


def _to_8_bit(img, path: str, where: str):
    """``img`` scaled to 8 bits where PIL's ``convert`` would not: it clips a 16-bit grey image (mode I;16, as PIL
    opens 16-bit PNG and TIFF files) at 255 instead of scaling it, which turns most of the image white. The scale is
    the full 16-bit range (a 12-bit image stored in 16 bits comes out 16x darker). 32-bit integer and float images
    have no fixed range to scale from: an error."""
    import numpy as np
    from PIL import Image

    tile = getattr(img, "tile", None) or [(None, None, None, "")]  # read before the pixels load (it empties then)
    rawmode = tile[0][3] if isinstance(tile[0][3], str) else (tile[0][3] or ("",))[0]
    # 16-bit PGMs (and PNGs before Pillow 10.3) open as mode I, their file's rawmode I;16
    if img.mode.startswith("I;16") or (img.mode == "I" and str(rawmode).startswith("I;16")):
        pixels = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8))
    if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "float"
        raise ImageReadError(f"urda_fast: image {path!r}{where} holds {kind} pixels, whose range urda_fast cannot "
                             "know; save it as an 8-bit (or 16-bit) image")
    return img


class ImageList(Dataset):
    """tllib's image list: each line of ``list_file`` is ``relative/path.jpg <label>`` (the path may hold spaces).

    Args:
        root: folder the relative paths start from.
        list_file: the list, absolute or relative to ``root``.
        transform: PIL image -> tensor (e.g. ``val_transform()``); None returns PIL images.
        num_classes: labels must lie in [0, num_classes); None skips the check.
        mode: PIL mode, "RGB" or "L" (grey digits).
        check_files: check at construction that every image exists (names the first missing one).

    ``dataset[i]`` is (image, label) with label an int.
    """

    def __init__(self, root: str, list_file: str, transform=None, num_classes: int | None = None, mode: str = "RGB",
                 check_files: bool = True):
        self.root, self.transform, self.mode = root, transform, mode
        self.list_file = list_file if os.path.isabs(list_file) else os.path.join(root, list_file)
        if not os.path.isfile(self.list_file):
            raise FileNotFoundError(f"urda_fast: image list {self.list_file!r} not found")
        self.samples, self.lines = [], []  # lines: each sample's line number in the list (error messages)
        # utf-8-sig: a byte-order mark (lists saved by Windows editors) would otherwise start the first path
        # surrogateescape: a list in another encoding (latin-1 file names) keeps its bytes, which os.path takes back
        with open(self.list_file, encoding="utf-8-sig", errors="surrogateescape") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.strip().rsplit(None, 1)  # the path keeps its inner runs of spaces and tabs
                if not parts:
                    continue
                label = int(parts[-1]) if parts[-1].isascii() and parts[-1].isdigit() else None
                if len(parts) < 2 or label is None:
                    raise ValueError(f"urda_fast: {self.list_file}:{lineno}: expected 'relative/path.jpg <label>' "
                                     f"with a label from 0 up, got {line.strip()!r}")
                if num_classes is not None and label >= num_classes:
                    raise ValueError(f"urda_fast: {self.list_file}:{lineno}: label {label} is out of range "
                                     f"[0, {num_classes})")
                path = parts[0]
                self.samples.append((path if os.path.isabs(path) else os.path.join(root, path), label))
                self.lines.append(lineno)
        if not self.samples:
            raise ValueError(f"urda_fast: image list {self.list_file} holds no images (expected lines like "
                             "'relative/path.jpg <label>')")
        if check_files:
            for lineno, (path, _) in zip(self.lines, self.samples):
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"urda_fast: image {path!r} listed in {self.list_file} (line {lineno}) "
                                            f"does not exist; paths in the list are relative to {root!r}")
        self.targets = [label for _, label in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        img = pil_loader(path, self.mode, where=f" (line {self.lines[index]} of image list {self.list_file})")
        return (self.transform(img) if self.transform is not None else img), label


def image_folder(root: str, transform=None, mode: str = "RGB", num_classes: int | None = None):
    """A torchvision ImageFolder (``root/<class>/*.png``; labels = sorted class folder names) loading in ``mode``."""
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(root):
        raise FileNotFoundError(f"urda_fast: image folder {root!r} not found (expected {root}/<class>/<image>)")
    try:
        dataset = ImageFolder(root, transform=transform, loader=functools.partial(pil_loader, mode=mode))  # picklable
    except FileNotFoundError as err:  # no class folder, or a class folder without images: torchvision names no path
        raise FileNotFoundError(f"urda_fast: image folder {root!r}: {err}") from err
    if num_classes is not None and len(dataset.classes) != num_classes:
        raise ValueError(f"urda_fast: {root!r} has {len(dataset.classes)} class folders, expected {num_classes}")
    return dataset


# ----------------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetSpec:
    """Where a benchmark's domains live under its root, in tllib's conventions.

    lists: domain -> {split: image list relative to root}; folders: domain -> {split: ImageFolder dir} (digits only);
    example: domain -> a typical list line, for error messages. Resize/crop/flip are tllib's defaults for it.
    domain_roots: each domain may also live in a folder of its own, ``root/<domain>/<list>`` with paths relative to
    it (tllib's digits: ``data/digits/MNIST/image_list/mnist_train.txt``).
    variants: domain -> (domain whose files it reads, PIL mode, resize size): tllib's RGB digits (``SVHNRGB``, its
    SVHN -> MNIST recipe at 32x32), read from their own folder or the grey domain's.
    mean, std: the per-channel normalisation of its models (one value: every channel); None: ImageNet's.
    """

    name: str
    num_classes: int
    lists: dict
    example: dict
    folders: dict = field(default_factory=dict)
    mode: str = "RGB"
    domain_roots: bool = False
    resize_size: int = 256
    crop_size: int | None = 224
    hflip: bool = True
    variants: dict = field(default_factory=dict)
    mean: float | None = None
    std: float | None = None

    @property
    def domains(self) -> tuple:
        return (*self.lists, *self.variants)

    def files_of(self, domain: str) -> str:
        """The domain whose image lists and folders ``domain`` reads (itself unless a variant)."""
        return self.variants[domain][0] if domain in self.variants else domain

    def read_as(self, domain: str) -> tuple:
        """(PIL mode, resize size) of the domain's images."""
        return self.variants[domain][1:] if domain in self.variants else (self.mode, self.resize_size)


def _same(path):  # Office-31 and Office-Home have no split: a domain is trained on and evaluated whole (tllib)
    return {"train": path, "test": path}


def _digits(name, train, test, example):
    return name, {"train": f"image_list/{train}", "test": f"image_list/{test}"}, example


_DIGITS = [_digits("MNIST", "mnist_train.txt", "mnist_test.txt", "mnist_train_image/00000.png 5"),
           _digits("USPS", "usps_train.txt", "usps_test.txt", "usps_train_image/00000.png 6"),
           _digits("SVHN", "svhn_balanced.txt", "svhn_balanced.txt", "svhn_image/00000.png 1")]

DATASETS = {
    "Office31": DatasetSpec(
        "Office31", 31,
        lists={d[0].upper(): _same(f"image_list/{d}.txt") for d in ("amazon", "dslr", "webcam")},
        example={d[0].upper(): f"{d}/images/back_pack/frame_0001.jpg 0" for d in ("amazon", "dslr", "webcam")}),
    "OfficeHome": DatasetSpec(
        "OfficeHome", 65,
        lists={d[:2]: _same(f"image_list/{d}.txt") for d in ("Art", "Clipart", "Product", "Real_World")},
        example={d[:2]: f"{d}/Alarm_Clock/00001.jpg 0" for d in ("Art", "Clipart", "Product", "Real_World")}),
    "VisDA2017": DatasetSpec(
        "VisDA2017", 12,
        lists={"Synthetic": _same("image_list/train.txt"), "Real": _same("image_list/validation.txt")},
        example={"Synthetic": "train/aeroplane/src_1_02691156_xxx.png 0", "Real": "validation/aeroplane/xxx.jpg 0"}),
    "Digits": DatasetSpec(
        "Digits", 10, lists={n: lists for n, lists, _ in _DIGITS}, example={n: ex for n, _, ex in _DIGITS},
        folders={n: {s: f"{n}/{s}" for s in ("train", "test")} for n, _, _ in _DIGITS},
        mode="L", domain_roots=True, resize_size=28, crop_size=None, hflip=False,
        variants={f"{n}RGB": (n, "RGB", 32) for n, _, _ in _DIGITS}, mean=0.5, std=0.5),
}


def _check_digit_classes(dataset, root):
    # Labels must mean the digit, so a folder tree mixes safely with an image list (label = digit there too).
    for i, name in enumerate(dataset.classes):
        if not name.startswith(str(i)):
            raise ValueError(f"urda_fast: {root!r}: class folder #{i} is {name!r}; digit folders must be named "
                             f"0..9 (optionally '0 - zero', ...) so that labels equal digits")


def open_domain(dataset: str, root: str, domain: str, split: str = "train", transform=None, mode: str | None = None,
                check_files: bool = True) -> Dataset:
    """One domain of a registered benchmark, read from local files.

    Args:
        dataset: "Office31" (A, D, W), "OfficeHome" (Ar, Cl, Pr, Rw), "VisDA2017" (Synthetic, Real),
            "Digits" (MNIST, USPS, SVHN; MNISTRGB, USPSRGB, SVHNRGB: the same files read as RGB, tllib's).
        root: the benchmark's folder (tllib layout).
        split: "train" or "test"; the same images for Office31/OfficeHome/VisDA2017, as in tllib.
        transform: e.g. ``train_transform()``; None returns PIL images.
        mode: PIL mode; default the domain's: "RGB", "L" for the grey digits.
    Returns (image, label) pairs, labels in [0, num_classes).
    """
    if dataset not in DATASETS:
        raise ValueError(f"urda_fast: unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[dataset]
    if domain not in spec.domains:
        raise ValueError(f"urda_fast: {dataset} has domains {', '.join(spec.domains)}, not {domain!r}")
    if split not in ("train", "test"):
        raise ValueError(f"urda_fast: split must be 'train' or 'test', not {split!r}")
    mode = mode or spec.read_as(domain)[0]
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"urda_fast: {dataset} root {root!r} does not exist; "
                                f"{_layout(spec, root, domain, split)}")
    files = spec.files_of(domain)
    list_file = spec.lists[files][split]  # relative to root: ImageList joins them (so does a relative root)
    for list_root in [root] + [os.path.join(root, d) for d in _domain_folders(spec, domain)]:
        if os.path.isfile(os.path.join(list_root, list_file)):
            return ImageList(list_root, list_file, transform, spec.num_classes, mode, check_files)
    folder = spec.folders.get(files, {}).get(split)
    if folder and os.path.isdir(os.path.join(root, folder)):
        data = image_folder(os.path.join(root, folder), transform, mode, spec.num_classes)
        _check_digit_classes(data, os.path.join(root, folder))
        return data
    raise FileNotFoundError(f"urda_fast: {dataset}/{domain} ({split}) not found; {_layout(spec, root, domain, split)}")


def _domain_folders(spec: DatasetSpec, domain: str) -> list:
    """The folders under the root a domain's lists may live in: its own (tllib downloads SVHNRGB into SVHNRGB/),
    then, for a variant, the domain whose files it reads."""
    if not spec.domain_roots:
        return []
    return list(dict.fromkeys((domain, spec.files_of(domain))))


def _layout(spec: DatasetSpec, root: str, domain: str, split: str) -> str:
    files = spec.files_of(domain)
    list_file = spec.lists[files][split]
    text = (f"expected {os.path.join(root, list_file)} with lines like {spec.example[files]!r} "
            f"(tllib image list: path relative to {root}, label in [0, {spec.num_classes}))")
    for folder in _domain_folders(spec, domain):
        text += f", or {os.path.join(root, folder, list_file)} (tllib's digits: one folder per domain)"
    if files in spec.folders:
        text += (f", or an ImageFolder tree {os.path.join(root, spec.folders[files][split])}/<digit>/*.png "
                 f"with class folders 0..9")
    return text


# --------------------------------------------------------------------------------------------------------- transforms


class ResizeImage:
    """tllib's ResizeImage: resize a PIL image to exactly (size, size) -- or (h, w) -- ignoring the aspect ratio."""

    def __init__(self, size):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, img):
        h, w = self.size
        return img.resize((w, h))

    def __repr__(self):
        return f"ResizeImage(size={self.size})"


def train_transform(resize_size: int = 256, crop_size: int | None = 224, hflip: bool = True):
    """tllib 'default' training transform: ResizeImage -> RandomResizedCrop -> RandomHorizontalFlip -> ToTensor.

    Gives (C, crop, crop) float in [0, 1]; no Normalize (the model normalises). crop_size None: resize only.
    """
    import torchvision.transforms as T

    steps = [ResizeImage(resize_size)]
    if crop_size:
        steps.append(T.RandomResizedCrop(crop_size))
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + [T.ToTensor()])


def val_transform(resize_size: int = 256, crop_size: int | None = 224):
    """tllib test transform: ResizeImage -> CenterCrop -> ToTensor, (C, crop, crop) in [0, 1], no Normalize."""
    import torchvision.transforms as T

    steps = [ResizeImage(resize_size)] + ([T.CenterCrop(crop_size)] if crop_size else [])
    return T.Compose(steps + [T.ToTensor()])


def default_transforms(dataset: str, domain: str | None = None):
    """(train, test) transforms with the benchmark's tllib defaults (224 crops; 28x28 resize, no flip for digits,
    32x32 for its RGB digit domains)."""
    spec = DATASETS[dataset]
    size = spec.read_as(domain)[1] if domain else spec.resize_size
    return (train_transform(size, spec.crop_size, spec.hflip),
            val_transform(size, spec.crop_size))


# ------------------------------------------------------------------------------------------------------------ loaders


class ResumableSampler(Sampler):
    """Shuffles each epoch with a generator seeded from (seed, epoch); can start an epoch at any position.

    Yields (index, sample_seed) pairs for ``SeededItems``. ``epoch``/``position`` describe the *next* ``iter()``;
    starting an iteration moves them on to (epoch + 1, 0), so plain ``for`` loops get a new order each epoch.

    Data-parallel sharding (``world_size > 1``): every rank draws the same epoch order and takes every
    ``world_size``-th sample of it from ``rank`` on (as ``DistributedSampler``), cut to ``num_samples // world_size``
    so every rank has as many. With batch B per rank, step k's batches of all ranks together are exactly positions
    ``[k*W*B, (k+1)*W*B)`` of the order: what one process with batch W*B would draw, sample seeds included.
    ``position`` then counts this rank's samples.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"urda_fast: rank {rank} outside [0, world_size={world_size})")
        if world_size > 1 and num_samples < world_size:
            raise ValueError(f"urda_fast: {num_samples} samples cannot be shared by {world_size} processes")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.shard_size = num_samples // world_size  # samples this rank sees per epoch
        self.epoch, self.position = 0, 0

    def epoch_order(self, epoch: int):
        """(order (n,) int64, per-sample seeds (n,) int64) of this rank's share of an epoch, from (seed, epoch)."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
        order = torch.randperm(self.num_samples, generator=g) if self.shuffle else torch.arange(self.num_samples)
        seeds = torch.randint(0, 2 ** 62, (self.num_samples,), generator=g)
        shard = slice(self.rank, self.shard_size * self.world_size, self.world_size)
        return order[shard], seeds[shard]

    def __iter__(self):
        # Capture and advance the state now, not lazily on the first next(): the caller may read it in between.
        epoch, start = self.epoch, self.position
        self.epoch, self.position = epoch + 1, 0
        order, seeds = self.epoch_order(epoch)
        return zip(order[start:].tolist(), seeds[start:].tolist())

    def __len__(self):
        return self.shard_size - self.position

    def state_dict(self, epoch: int | None = None, position: int | None = None):
        state = {"epoch": self.epoch if epoch is None else epoch,
                 "position": self.position if position is None else position, "seed": self.seed}
        if self.world_size > 1:
            state["world_size"] = self.world_size
        return state

    def load_state_dict(self, state):
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"urda_fast: sampler state is for seed {state['seed']}, this sampler has {self.seed}")
        position, saved_world = int(state["position"]), int(state.get("world_size", 1))
        if saved_world != self.world_size:
            # Another number of processes: continue after the same count of samples of the epoch, overall.
            position = position * saved_world // self.world_size
        if not 0 <= position <= self.shard_size:
            raise ValueError(f"urda_fast: position {position} outside [0, {self.shard_size}]")
        self.epoch, self.position = int(state["epoch"]), position


class SeededItems(Dataset):
    """Wraps a dataset so ``self[(index, seed)]`` runs ``dataset[index]`` (its random transforms) under ``seed``."""

    def __init__(self, dataset: Dataset, reseed: bool = True):
        self.dataset, self.reseed = dataset, reseed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        if not self.reseed:
            return self.dataset[index]
        # fork_rng restores the global CPU RNG afterwards, so the training loop's own random stream is unaffected.
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone: torch.manual_seed would also reseed the GPUs' generators, which fork_rng
            # (devices=[]) does not restore: the training's dropout and random starts would restart at each sample
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def make_loader(dataset: Dataset, batch_size: int, train: bool, seed: int = 0, num_workers: int = 0,
                drop_last: bool | None = None, reseed_transforms: bool = True, pin_memory: bool = False,
                rank: int = 0, world_size: int = 1) -> DataLoader:
    """A DataLoader whose order (and, for train, augmentation) is a function of ``seed``.

    train=True: a ``ResumableSampler`` (reshuffled every epoch) and drop_last=True by default (tllib);
    ``rank``/``world_size`` (train only): this process's share of each epoch under DDP (see ``ResumableSampler``).
    train=False: dataset order, every sample once. Batches are what the dataset yields, collated.
    For train, ``loader.dataset`` is a ``SeededItems`` (the original is ``loader.dataset.dataset``); the per-sample
    seeding covers transforms that draw from torch's RNG (all torchvision ones), not Python's ``random`` or NumPy's.
    Without ``ForeverDataIterator``, resume a plain loop with ``loader.sampler.load_state_dict({"epoch": e,
    "position": batches_done * batch_size})``.
    """
    generator = torch.Generator().manual_seed(seed)  # base seed for workers; keeps the global RNG untouched
    init = own_process_group if num_workers > 0 else None
    if not train:
        return DataLoader(dataset, batch_size, shuffle=False, drop_last=bool(drop_last), num_workers=num_workers,
                          pin_memory=pin_memory, generator=generator, worker_init_fn=init)
    sampler = ResumableSampler(len(dataset), seed, rank=rank, world_size=world_size)
    # Persistent workers: an epoch of a small domain (Office-31's webcam: 24 batches of 32) would otherwise start
    # its worker processes again every few dozen steps. The order and the per-sample seeds come from the sampler,
    # in this process, so the batches are the same either way.
    return DataLoader(SeededItems(dataset, reseed_transforms), batch_size, sampler=sampler,
                      drop_last=True if drop_last is None else drop_last, num_workers=num_workers,
                      pin_memory=pin_memory, generator=generator, worker_init_fn=init,
                      persistent_workers=num_workers > 0)


def own_process_group(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker leaves the main process's process group. A SIGTERM or Ctrl-C sent to
    the group (``kill -- -PGID``, coreutils ``timeout``, a terminal) then reaches the main process alone: a worker it
    killed would make torch raise in the main process at once, before the training loop could finish its step and
    save last.pt. The main process still stops its workers (and they exit on their own when it is gone)."""
    if hasattr(os, "setpgid"):  # POSIX; Windows has no process groups of this kind
        os.setpgid(0, 0)


class ForeverDataIterator:
    """tllib's endless iterator: restarts the loader when an epoch ends; ``state_dict()`` makes it resumable.

    Args:
        loader: a DataLoader; resuming needs one from ``make_loader(train=True)`` (a ``ResumableSampler``).
        device: if given, tensors in each batch are moved there.
    """

    def __init__(self, loader: DataLoader, device=None):
        self.loader, self.device = loader, device
        self.sampler = loader.sampler if isinstance(loader.sampler, ResumableSampler) else None
        self._it, self._epoch, self._start, self._consumed = None, 0, 0, 0

    def _restart(self):
        if self.sampler is not None:
            self._epoch, self._start = self.sampler.epoch, self.sampler.position
        self._it, self._consumed = iter(self.loader), 0

    def __next__(self):
        # Up to two restarts: a resumed epoch may have nothing left, the next one must not be empty.
        for _ in range(3):
            if self._it is None:
                self._restart()
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                continue
            self._consumed += 1
            return _to_device(batch, self.device) if self.device is not None else batch
        raise RuntimeError("urda_fast: the loader yields no batches (dataset smaller than a batch with drop_last?)")

    def __iter__(self):
        return self

    def __len__(self):
        return len(self.loader)

    def state_dict(self):
        """{"epoch", "position"}: the first sample not yet handed out (prefetched batches do not count)."""
        if self.sampler is None:
            raise TypeError("urda_fast: only loaders from make_loader(train=True) can be resumed")
        if self._it is None:
            return self.sampler.state_dict()
        # min(): a final partial batch (drop_last=False) ends the epoch although it holds < batch_size samples.
        position = min(self._start + self._consumed * self.loader.batch_size, self.sampler.shard_size)
        return self.sampler.state_dict(self._epoch, position)

    def load_state_dict(self, state):
        if self.sampler is None:
            raise TypeError("urda_fast: only loaders from make_loader(train=True) can be resumed")
        self.sampler.load_state_dict(state)
        self._it = None  # drop any prefetching iterator; the next batch starts at the loaded position


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


def train_stream(dataset: Dataset, batch_size: int, seed: int, device, num_workers: int = 0) -> ForeverDataIterator:
    """Endless shuffled batches whose order and augmentation depend on ``seed`` only, resumable mid-epoch.

    Under torchrun, this process's share of every epoch (``batch_size`` is per process). ``num_workers`` processes
    read files (the batches do not depend on it); in-memory tensors are read in this process whatever it is. Batches
    for a CUDA device come in pinned memory: the copy to the device is then asynchronous (from pageable memory it
    waits for the work queued before it, a stall at every step)."""
    ctx = distributed.context()
    if batch_size < 1:
        raise ValueError(f"urda_fast: batch_size must be >= 1, got {batch_size}")
    if len(dataset) // ctx.world_size < batch_size:
        raise ValueError(f"urda_fast: a dataset of {len(dataset)} samples cannot fill a batch of {batch_size}"
                         + (f" on each of {ctx.world_size} processes" if ctx.enabled else ""))
    # In-memory tensors have no random transforms: skip the per-sample reseeding.
    loader = make_loader(dataset, batch_size, train=True, seed=seed, num_workers=loader_workers(dataset, num_workers),
                         reseed_transforms=not isinstance(dataset, TensorDataset), rank=ctx.rank,
                         world_size=ctx.world_size,
                         pin_memory=device is not None and torch.device(device).type == "cuda")
    return ForeverDataIterator(loader, device=device)


def loader_workers(dataset: Dataset, requested: int) -> int:
    """``requested`` DataLoader workers, or 0 for in-memory tensors (worker start-up would cost more than it saves)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return 0 if isinstance(dataset, TensorDataset) else requested


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, device) -> DataLoader:
    """Every sample once, in dataset order, decoded by ``loader_workers`` processes (out of the process group, see
    ``own_process_group``); page-locked for a CUDA ``device``, where a batch from pageable memory is copied
    synchronously (``.to(device, non_blocking=True)`` then blocks the host)."""
    return make_loader(dataset, batch_size, train=False, num_workers=loader_workers(dataset, num_workers),
                       pin_memory=torch.device(device).type == "cuda")


def subset(dataset: Dataset, count: int, seed: int = 0) -> Dataset:
    """A fixed random subset of ``count`` samples, in their order (all when count <= 0 or >= len): part of a
    class-sorted set (image lists, ImageFolders) taken as its first batches would hold its first classes alone."""
    if count <= 0 or count >= len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return torch.utils.data.Subset(dataset, idx.tolist())
