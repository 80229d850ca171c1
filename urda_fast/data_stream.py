"""A resumable, infinite stream of shuffled mini-batches from an indexable dataset.

Each epoch's order is a permutation drawn from a generator seeded with (seed, epoch), and the stream's whole state is
(epoch, position), so a run killed after any step resumes with exactly the batches it would have seen.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset, default_collate


class BatchStream:
    """Infinite batches of ``batch_size`` (the last partial batch of an epoch is dropped, as tllib does)."""

    def __init__(self, dataset, batch_size: int, seed: int = 0, device=None):
        if len(dataset) < batch_size:
            raise ValueError(f"urda_fast: a dataset of {len(dataset)} samples cannot fill a batch of {batch_size}")
        self.dataset, self.batch_size, self.seed, self.device = dataset, batch_size, seed, device
        self.epoch, self.position = 0, 0
        self._order = None

    def _permutation(self):
        if self._order is None:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._order = torch.randperm(len(self.dataset), generator=gen)
        return self._order

    def __iter__(self):
        return self

    def __next__(self):
        if self.position + self.batch_size > len(self.dataset):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        idx = self._permutation()[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        if isinstance(self.dataset, TensorDataset):
            batch = tuple(t[idx] for t in self.dataset.tensors)
        else:
            batch = default_collate([self.dataset[int(i)] for i in idx])
        if self.device is not None:
            batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
        return batch

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state):
        if state["seed"] != self.seed:
            raise ValueError(f"urda_fast: the checkpoint's data seed {state['seed']} differs from this run's {self.seed}")
        self.epoch, self.position, self._order = state["epoch"], state["position"], None
