"""Robust accuracy: clean and attacked accuracy of a classifier over a data loader, as a table."""

from __future__ import annotations

import csv
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from urda_fast.attacks.base import frozen_eval


def _table_format(path) -> str:
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in (".csv", ".json", ".md"):
        raise ValueError(f"urda_fast: unknown table format {ext!r} ({path}); use .csv, .json or .md")
    return ext


@dataclass
class RobustRow:
    attack: str
    accuracy: float  # percent
    correct: int
    count: int
    seconds: float
    images_per_s: float


class RobustTable:
    """Rows of :class:`RobustRow`; printable, and writable as CSV, JSON or Markdown."""

    def __init__(self, rows):
        self.rows = list(rows)

    def __getitem__(self, attack: str) -> RobustRow:
        for row in self.rows:
            if row.attack == attack:
                return row
        raise KeyError(f"{attack!r}: the table has {[row.attack for row in self.rows]}")

    def to_markdown(self) -> str:
        lines = ["| attack | accuracy (%) | correct / count | seconds | images/s |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r.attack} | {r.accuracy:.2f} | {r.correct} / {r.count} | {r.seconds:.2f} | "
                  f"{r.images_per_s:.1f} |" for r in self.rows]
        return "\n".join(lines)

    def __str__(self):
        return self.to_markdown()

    def save(self, path) -> None:
        """Write the table; the format follows the extension (.csv, .json or .md). Written atomically."""
        ext = _table_format(path)
        tmp = f"{path}.tmp"
        with open(tmp, "w", newline="") as f:
            if ext == ".csv":
                writer = csv.DictWriter(f, fieldnames=list(asdict(self.rows[0]))) if self.rows else None
                if writer:
                    writer.writeheader()
                    writer.writerows(asdict(r) for r in self.rows)
            elif ext == ".json":
                json.dump({"rows": [asdict(r) for r in self.rows]}, f, indent=2)
            else:
                f.write(self.to_markdown() + "\n")
        os.replace(tmp, path)


def robust_accuracy(model, loader, attacks, *, device=None, max_batches=None, progress=True, save=()):
    """Accuracy of ``model`` on ``loader``'s (images, labels) batches, clean and under each attack.

    Args:
        model: images -> logits (evaluated in eval mode; its modes are restored afterwards).
        loader: iterable of (images, labels).
        attacks: ``{"clean": None, "PGD-20": PGD(model, ...), ...}``; ``None`` means the clean images.
        device: where to run (default: the model's device).
        max_batches: stop after this many batches (None or 0: all).
        save: paths to write the table to (.csv/.json/.md).

    Returns:
        a :class:`RobustTable`, one row per attack, in the order given.
    """
    if not attacks:
        raise ValueError("urda_fast: give at least one attack, e.g. {'clean': None}")
    for name, attack in attacks.items():
        if not isinstance(name, str):
            raise TypeError(f"urda_fast: attack names are the table's row names and must be strings, got {name!r}")
        if attack is not None and not callable(attack):
            raise TypeError(f"urda_fast: attacks[{name!r}] must be None (the clean images) or an attack called as "
                            f"attack(images, labels), got {type(attack).__name__}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 0):
        raise ValueError(f"urda_fast: max_batches must be None or an integer >= 0 (0 = all), got {max_batches!r}")
    save = (save,) if isinstance(save, (str, os.PathLike)) else tuple(save)
    for path in save:  # before any work, not after the last attack
        _table_format(path)
    device = torch.device(device) if device is not None else _model_device(model)
    correct = {name: 0 for name in attacks}
    seconds = {name: 0.0 for name in attacks}
    count = 0
    # islice: a loader is not asked for the batch after the last one wanted (its workers may still prefetch a few)
    max_batches = max_batches or None  # 0 = all, as the commands' --max-batches
    batches = loader if max_batches is None else itertools.islice(loader, max_batches)
    bar = tqdm(batches, desc="robust accuracy", disable=not progress, total=_length(loader, max_batches))
    for batch in bar:
        images, labels = _images_and_labels(batch)
        # non_blocking: a pinned batch's copy overlaps the host's work; the first kernel that reads it waits for it
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        _check_labels(images, labels)
        if labels.shape[0] == 0:  # nothing to attack or count (a filtered batch, a last partial one of nothing)
            continue
        for name, attack in attacks.items():
            start = time.perf_counter()
            inputs = images if attack is None else attack(images, labels)
            with torch.no_grad(), frozen_eval(model):
                logits = model(inputs)
                logits = logits[0] if isinstance(logits, (tuple, list)) else logits
                # One host read for both: NaN logits still have an argmax, which would count as predictions.
                hits, has_nan = torch.stack([(logits.argmax(1) == labels).sum(), logits.isnan().any()]).tolist()
                if has_nan:
                    raise FloatingPointError(f"urda_fast: the model's logits contain NaN ({_where(name, attack)}); "
                                             "check its weights (a diverged run?) and the data for NaN / inf")
                correct[name] += int(hits)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[name] += time.perf_counter() - start
        count += labels.shape[0]
        bar.set_postfix({name: f"{100 * correct[name] / count:.1f}" for name in attacks})
    if count == 0:  # a 0% row would read as a broken model
        raise ValueError("urda_fast: the loader yielded no images to evaluate (an empty dataset or split?)")
    rows = [RobustRow(name, 100.0 * correct[name] / max(count, 1), correct[name], count, seconds[name],
                      count / seconds[name] if seconds[name] else 0.0) for name in attacks]
    table = RobustTable(rows)
    for path in save:
        table.save(path)
    return table


def _where(name: str, attack) -> str:
    return "on the clean images" if attack is None else f"on the images of attack {name!r}"


def check_loader_settings(batch_size, num_workers, max_batches, who: str) -> None:
    """Clear errors, before any work, for evaluation loader settings that DataLoader would reject late or obscurely
    (max_batches: None or 0 = all batches)."""
    for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                               ("max_batches", max_batches or 0, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{who}: {name} must be an integer >= {least}, got {value!r}")


def _model_device(model):
    tensor = next(model.parameters(), None)
    tensor = tensor if tensor is not None else next(model.buffers(), None)
    if tensor is None:
        raise ValueError("urda_fast: the model has no parameters or buffers to take a device from; pass "
                         "robust_accuracy(..., device='cpu' or 'cuda')")
    return tensor.device


def _check_labels(images, labels):
    # (B, 1) labels would broadcast against (B,) predictions and count B * B pairs: accuracies above 100%.
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"urda_fast: labels must have shape (batch,) = ({images.shape[0]},), got "
                         f"{tuple(labels.shape)}; squeeze or flatten them (labels.view(-1))")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"urda_fast: labels must be integer class indices, got {labels.dtype}")


def _images_and_labels(batch):
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(torch.is_tensor(t) for t in batch):
        return batch
    what = (f"a dict with keys {sorted(batch)}" if isinstance(batch, dict) else
            f"a {type(batch).__name__} of {len(batch)} items" if isinstance(batch, (tuple, list)) else
            type(batch).__name__)
    raise ValueError(f"urda_fast: the loader must yield (images, labels) pairs of tensors, got {what}; map its "
                     "batches to pairs first, e.g. ((b['image'], b['label']) for b in loader)")


def _length(loader, max_batches):
    try:
        n = len(loader)
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)
