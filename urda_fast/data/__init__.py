"""Data: the embedded offline digits benchmark and real tllib-format datasets, with resumable loaders.

- ``load_digits_shift()`` -- printed -> handwritten digits, built offline (digits.py).
- ``open_domain()``, ``ImageList``, ``image_folder`` -- Office-31, Office-Home, VisDA-2017, Digits from local files;
  ``train_transform`` / ``val_transform`` -- tllib's, ending at ToTensor ([0, 1], no Normalize) (domains.py).
- ``make_loader``, ``ForeverDataIterator``, ``ResumableSampler`` -- seeded loaders that resume bit-for-bit;
  ``subset`` -- a fixed random sample (evaluation on part of a class-sorted set).
"""

from .digits import DigitsShift, load_digits_shift
from .domains import (
    DATASETS,
    DatasetSpec,
    ForeverDataIterator,
    ImageList,
    ImageReadError,
    ResizeImage,
    ResumableSampler,
    SeededItems,
    default_transforms,
    eval_loader,
    image_folder,
    loader_workers,
    make_loader,
    open_domain,
    subset,
    train_stream,
    train_transform,
    val_transform,
)

__all__ = [
    "DATASETS", "DatasetSpec", "DigitsShift", "ForeverDataIterator", "ImageList", "ImageReadError", "ResizeImage",
    "ResumableSampler", "SeededItems", "default_transforms", "eval_loader", "image_folder", "load_digits_shift",
    "loader_workers", "make_loader", "open_domain", "subset", "train_stream", "train_transform", "val_transform",
]
