"""Data derived from a collection's vectors, valid for one database generation:
the database-side augmented vectors (DBA) and the k-reciprocal
neighbourhoods (see reranking.py).

SQLite stays the source of truth: nothing here is stored. The database's
generation counter (bumped by every write; `Gallery` keeps each collection's
latest in memory, updated under its write lock once a write is in memory)
tags each entry. A search that needs derived data reads the collection's
generation first, then asks for the entry: when the entry's generation
differs, everything derived from the collection is dropped and rebuilt from a
snapshot taken now, while that search (and any other search needing the same
collection's derived data) waits. So the first such search after a write
pays the G x G pass; later ones reuse it; a search that starts after a
Delete or Upsert returned never sees the old vectors (the snapshot is taken
after the generation it is tagged with). A snapshot may hold writes newer
than its tag: the next search then rebuilds once more, never serves older data.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
# Entries kept per collection and generation (e.g. k-reciprocal data for a few
# (k1, k2) pairs); the least recently used goes first.
MAX_ENTRIES = 4


class _Entry:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.generation: int | None = None
        self.values: collections.OrderedDict = collections.OrderedDict()


class DerivedData:
    """Per collection: {key: value} for one generation. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def get(self, collection: str, generation: int, key: Hashable, build: Callable[[], T]) -> T:
        with self._lock:
            entry = self._entries.setdefault(collection, _Entry())
        with entry.lock:
            if entry.generation != generation:
                entry.values.clear()
                entry.generation = generation
            if key in entry.values:
                entry.values.move_to_end(key)
                return entry.values[key]
            t0 = time.perf_counter()
            value = build()
            log.info("collection %r: derived %s for generation %d in %.2fs", collection, key, generation,
                     time.perf_counter() - t0)
            entry.values[key] = value
            while len(entry.values) > MAX_ENTRIES:
                entry.values.popitem(last=False)
            return value

    def nbytes(self, collection: str) -> int:
        """Memory the collection's derived data holds (values with `nbytes` or `memory_bytes()`)."""
        entry = self._entries.get(collection)
        if entry is None:
            return 0
        total = 0
        for value in list(entry.values.values()):
            total += value.memory_bytes() if hasattr(value, "memory_bytes") else int(getattr(value, "nbytes", 0))
        return total

    def drop(self, collection: str) -> None:
        with self._lock:
            self._entries.pop(collection, None)
