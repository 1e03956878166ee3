"""Item attributes: their limits, attribute filters, and the in-memory table a
filtered search asks which names pass. No SQLite, no gRPC.

An item's attributes are a small `{key: value}` map of strings (class, shop,
sha256, ...) stored with it. A filter passes an item whose value of `key` is
one of `values` (one value: equality; several: IN); a query's filters all
must pass (AND). The table keeps, per collection, each name's attributes and
an inverted index (key, value) -> names, so a filter costs the size of its
answer, not of the collection.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import unicodedata
from collections.abc import Iterable, Mapping, Sequence

from imagesearch import errors
from imagesearch.defaults import (
    MAX_ATTRIBUTE_KEY_CHARS,
    MAX_ATTRIBUTE_VALUE_CHARS,
    MAX_ATTRIBUTES,
    MAX_FILTER_VALUES,
    MAX_FILTERS,
)

Attributes = Mapping[str, str]
NO_ATTRIBUTES: Mapping[str, str] = {}


@dataclasses.dataclass(frozen=True)
class AttributeFilter:
    key: str
    values: frozenset[str]

    def passes(self, attributes: Attributes) -> bool:
        value = attributes.get(self.key)
        return value is not None and value in self.values


def _check_key(key: str, what: str) -> None:
    if not isinstance(key, str) or not key:
        raise errors.InvalidArgument(f"{what}: empty attribute key")
    if len(key) > MAX_ATTRIBUTE_KEY_CHARS:
        raise errors.InvalidArgument(f"{what}: attribute key {key[:40]!r}... has {len(key)} characters; "
                                     f"at most {MAX_ATTRIBUTE_KEY_CHARS} are allowed")
    if any(unicodedata.category(ch) == "Cc" for ch in key):
        raise errors.InvalidArgument(f"{what}: attribute key {key!r} contains control characters")


def _check_value(key: str, value: str, what: str) -> None:
    if not isinstance(value, str):
        raise errors.InvalidArgument(f"{what}: attribute {key!r} is not a string")
    if len(value) > MAX_ATTRIBUTE_VALUE_CHARS:
        raise errors.InvalidArgument(f"{what}: attribute {key!r} has a value of {len(value)} characters; "
                                     f"at most {MAX_ATTRIBUTE_VALUE_CHARS} are allowed")
    if "\x00" in value:
        raise errors.InvalidArgument(f"{what}: attribute {key!r} has a value with a NUL character")


def check_attributes(attributes: Attributes | None, *, what: str) -> dict[str, str]:
    """A validated plain copy of an item's attributes (InvalidArgument past the limits)."""
    if not attributes:
        return {}
    if len(attributes) > MAX_ATTRIBUTES:
        raise errors.InvalidArgument(f"{what}: {len(attributes)} attributes; at most {MAX_ATTRIBUTES} are allowed")
    out = {}
    for key, value in attributes.items():
        _check_key(key, what)
        _check_value(key, value, what)
        out[key] = value
    return out


def check_filters(filters: Iterable[tuple[str, Sequence[str]]], *, what: str) -> tuple[AttributeFilter, ...]:
    """Validated filters from (key, values) pairs; filters on the same key
    intersect (both must pass)."""
    out = []
    for i, (key, values) in enumerate(filters):
        if i >= MAX_FILTERS:
            raise errors.InvalidArgument(f"{what}: more than {MAX_FILTERS} attribute filters")
        _check_key(key, f"{what}: filter {i}")
        values = list(values)
        if not values:
            raise errors.InvalidArgument(f"{what}: filter {i} on {key!r} has no values: it would pass nothing")
        if len(values) > MAX_FILTER_VALUES:
            raise errors.InvalidArgument(f"{what}: filter {i} on {key!r} has {len(values)} values; "
                                         f"at most {MAX_FILTER_VALUES} are allowed")
        for value in values:
            _check_value(key, value, f"{what}: filter {i}")
        out.append(AttributeFilter(key, frozenset(values)))
    return tuple(out)


def passes(attributes: Attributes, filters: Sequence[AttributeFilter]) -> bool:
    return all(f.passes(attributes) for f in filters)


def to_json(attributes: Attributes) -> str:
    """The stored form: compact JSON with sorted keys ('{}' for none)."""
    return json.dumps(dict(attributes), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def from_json(text: str | None) -> dict[str, str]:
    return json.loads(text) if text and text != "{}" else {}


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
