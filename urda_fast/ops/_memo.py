"""Values derived from tensors, kept while those very tensors live unchanged.

Used where a hot loop passes the same tensors again and again: ``pgd_step``'s bound checks (an attack in normalised
space passes one (lower, upper) pair every step, and reading their values is a host sync on a GPU),
``FastConv2d``'s contiguous weight blocks of frozen weights (one copy per weight instead of one per forward) and
``batch_norm_eval``'s per-channel constants (one computation per set of statistics).
"""

from __future__ import annotations

import weakref


class VersionedMemo:
    """Entries keyed by the identity of a tuple of tensors. An entry answers only while every one of those tensors is
    alive (a weak reference tells it from a new tensor at a recycled id) and unchanged (its version counter, which an
    in-place change bumps). Callers keep out tensors without a version counter (inference tensors) and traced calls.
    Entries of dead tensors are dropped at the next ``put``; past ``max_entries`` all are."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self.entries: dict[tuple, tuple] = {}  # ids -> (weak references, versions, value)

    def get(self, tensors: tuple):
        """The value stored for ``tensors`` as they are now, else None."""
        entry = self.entries.get(tuple(map(id, tensors)))
        if entry is None:
            return None
        refs, versions, value = entry
        if all(ref() is t for ref, t in zip(refs, tensors)) and versions == tuple(t._version for t in tensors):
            return value
        return None

    def put(self, tensors: tuple, value) -> None:
        for key in [key for key, (refs, _, _) in self.entries.items() if any(ref() is None for ref in refs)]:
            del self.entries[key]
        if len(self.entries) >= self.max_entries:
            self.entries.clear()
        self.entries[tuple(map(id, tensors))] = (tuple(map(weakref.ref, tensors)),
                                                 tuple(t._version for t in tensors), value)
