"""Item attributes in memory: per collection, the table a filtered search
asks which names pass. No SQLite, no gRPC.

An item's attributes are a small `{key: value}` map of strings (class, shop,
sha256, ...) stored with it. A filter passes an item whose value of `key` is
one of `values` (one value: equality; several: IN); a query's filters all
must pass (AND). The table keeps, per collection, each name's attributes and
an inverted index (key, value) -> names, so a filter costs the size of its
answer, not of the collection.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence

from ranker_service.types import AttributeFilter

NO_ATTRIBUTES: Mapping[str, str] = {}


class AttributeTable:
    """One collection's attributes in memory. Thread-safe (one lock; every
    operation is O(its own items))."""

    def __init__(self) -> None:
        self._attributes: dict[str, Mapping[str, str]] = {}
        self._postings: dict[tuple[str, str], set[str]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._attributes)

    def get(self, name: str) -> Mapping[str, str]:
        return self._attributes.get(name, NO_ATTRIBUTES)

    def _drop(self, name: str) -> None:
        old = self._attributes.pop(name, None)
        for pair in (old or {}).items():
            names = self._postings.get(pair)
            if names is not None:
                names.discard(name)
                if not names:
                    del self._postings[pair]

    def set(self, items: Iterable[tuple[str, Mapping[str, str]]]) -> None:
        """Replace the attributes of each name (the last of repeated names wins)."""
        with self._lock:
            for name, attributes in items:
                self._drop(name)
                if attributes:
                    self._attributes[name] = attributes
                    for pair in attributes.items():
                        self._postings.setdefault(pair, set()).add(name)

    def delete(self, names: Iterable[str]) -> None:
        with self._lock:
            for name in names:
                self._drop(name)

    def rename(self, renamings: Iterable[tuple[str, str]]) -> None:
        """Move attributes to new names, in order (a target's own are replaced)."""
        with self._lock:
            for old, new in renamings:
                attributes = self._attributes.get(old)
                self._drop(old)
                self._drop(new)
                if attributes:
                    self._attributes[new] = attributes
                    for pair in attributes.items():
                        self._postings.setdefault(pair, set()).add(new)

    def matching(self, filters: Sequence[AttributeFilter]) -> set[str]:
        """The names that pass every filter: the smallest filter's postings,
        then checked against the others."""
        if not filters:
            raise ValueError("matching() needs at least one filter")
        with self._lock:
            per_filter = []
            for f in filters:
                names: set[str] = set()
                for value in f.values:
                    names |= self._postings.get((f.key, value), set())
                per_filter.append(names)
        per_filter.sort(key=len)
        result = set(per_filter[0])
        for names in per_filter[1:]:
            result &= names
        return result


class AttributeTables:
    """Every collection's table, created on first use."""

    def __init__(self) -> None:
        self._tables: dict[str, AttributeTable] = {}
        self._lock = threading.Lock()

    def table(self, collection: str) -> AttributeTable:
        table = self._tables.get(collection)
        if table is None:
            with self._lock:
                table = self._tables.setdefault(collection, AttributeTable())
        return table

    def drop(self, collection: str) -> None:
        with self._lock:
            self._tables.pop(collection, None)
