"""Values derived from tensors, kept while those very tensors live unchanged, inside a :func:`memo_scope`.

Used where a hot loop passes the same tensors again and again: ``pgd_step``'s bound checks (an attack in normalised
space passes one (lower, upper) pair every step, and reading their values is a host sync on a GPU),
``FastConv2d``'s contiguous weight blocks of frozen weights (one copy per weight instead of one per forward) and
``batch_norm_eval``'s per-channel constants (one computation per set of statistics).

A tensor's version counter misses writes through ``.data`` (``p.data.mul_(...)`` in EMA teachers, ``p.data = ...``
in ``vector_to_parameters``), so a memo answers only inside a scope whose owner vouches that no tensor changes behind
autograd's back: an attack, whose many forwards run one frozen model. Outside a scope every lookup misses.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

_state = threading.local()


@contextlib.contextmanager
def memo_scope():
    """Memos answer inside the block (nested blocks join the outermost); entries stored in it answer in it only."""
    if getattr(_state, "scope", None) is not None:
        yield
        return
    _state.scope = object()
    try:
        yield
    finally:
        _state.scope = None


def _current_scope():
    return getattr(_state, "scope", None)


class VersionedMemo:
    """Entries keyed by the identity of a tuple of tensors. An entry answers only inside the :func:`memo_scope` that
    stored it, while every one of those tensors is alive (a weak reference tells it from a new tensor at a recycled
    id) and unchanged (its version counter, which an in-place change bumps). Callers keep out tensors without a
    version counter (inference tensors) and traced calls. Entries of dead tensors and of ended scopes are dropped at
    the next ``put``; past ``max_entries`` all are."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._local = threading.local()  # scopes are per thread, so are the entries: two threads' attacks share none

    @property
    def entries(self) -> dict:
        """This thread's entries: ids -> (scope, weak references, versions, value)."""
        entries = getattr(self._local, "entries", None)
        if entries is None:
            entries = self._local.entries = {}
        return entries

    def get(self, tensors: tuple):
        """The value stored for ``tensors`` as they are now, in this scope, else None."""
        scope = _current_scope()
        entry = None if scope is None else self.entries.get(tuple(map(id, tensors)))
        if entry is None:
            return None
        stored_in, refs, versions, value = entry
        if (stored_in is scope and all(ref() is t for ref, t in zip(refs, tensors))
                and versions == tuple(t._version for t in tensors)):
            return value
        return None

    def put(self, tensors: tuple, value) -> None:
        """Store ``value`` for ``tensors`` in the current scope (outside one, nothing is stored)."""
        scope = _current_scope()
        if scope is None:
            return
        stale = [key for key, (stored_in, refs, _, _) in self.entries.items()
                 if stored_in is not scope or any(ref() is None for ref in refs)]
        for key in stale:
            del self.entries[key]
        if len(self.entries) >= self.max_entries:
            self.entries.clear()
        self.entries[tuple(map(id, tensors))] = (scope, tuple(map(weakref.ref, tensors)),
                                                 tuple(t._version for t in tensors), value)
