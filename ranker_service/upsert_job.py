"""One Upsert call fed an item at a time, shared by both backends.

The async servicer reads an Upsert stream without a thread: `add(item)` is
quick (validation) and returns True when `flush()` is due, or, with `failed`
set, when an invalid item ended the call; `flush()` and `finish()` write.
This base keeps what both backends count and say: how many items were
committed, the failure that ended the call, and the messages that name the
items not committed. A backend gives `_prepare` (validate one item), `_due`
(flush now?) and `flush` (commit what is queued, through `_commit_batch`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from imagesearch import errors
from imagesearch.errors import shorten


@dataclasses.dataclass(frozen=True)
class UpsertItem:
    collection: str
    name: str
    vector: Sequence[float] | np.ndarray
    fingerprint: str = ""
    attributes: Mapping[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class UpsertResult:
    upserted: int
    inserted: int
    replaced: int


@dataclasses.dataclass(frozen=True)
class _Pending:
    index: int
    collection: str
    name: str
    vector: np.ndarray  # float32 unit
    fingerprint: str
    attributes: dict[str, str]

    @property
    def what(self) -> str:
        return describe_item(self.index, self.name)


def describe_item(index: int, name: str) -> str:
    return f"item {index} (name {shorten(name)!r})"


def _with_progress(exc: errors.ImageSearchError, committed: int) -> errors.ImageSearchError:
    """The same kind of error, its message ending with the call's progress."""
    return type(exc)(f"{exc} [{committed} items of this call were committed before it; nothing from it on]")


class UpsertJob:
    """See the module docstring; `Gallery.upsert_job` and
    `MilvusGallery.upsert_job` return subclasses."""

    def __init__(self, gallery):
        self._gallery = gallery
        self._pending: list[_Pending] = []
        self._count = 0
        self.failure: errors.ImageSearchError | None = None
        self.committed = self.inserted = self.replaced = 0

    @property
    def failed(self) -> bool:
        return self.failure is not None

    def fail(self, exc: errors.ImageSearchError) -> None:
        """End the call with `exc` (after committing the valid items before it)."""
        if self.failure is None:
            self.failure = exc

    def add(self, item: UpsertItem) -> bool:
        if self.failed:
            return True
        index = self._count
        self._count += 1
        try:
            p = self._prepare(index, item)
        except errors.ImageSearchError as exc:
            self.fail(exc)
            return True
        self._pending.append(p)
        return len(self._pending) >= self._gallery.batch_size or self._due(p)

    def _prepare(self, index: int, item: UpsertItem) -> _Pending:
        """The validated item (a domain error if it is not valid)."""
        raise NotImplementedError

    def _due(self, p: _Pending) -> bool:
        """Flush now, before the batch is full?"""
        return False

    def flush(self) -> None:
        raise NotImplementedError

    def _commit_batch(self, batch: list[_Pending], commit: Callable[[list[_Pending]], tuple]) -> tuple:
        """`commit(batch)`, which returns (inserted, replaced, ...), counted;
        its domain error said again with the items it did not commit."""
        try:
            result = commit(batch)
        except errors.ImageSearchError as exc:
            first, last = batch[0], batch[-1]
            raise type(exc)(
                f"{exc}: items {first.index}..{last.index} (names {shorten(first.name)!r}..{shorten(last.name)!r}) "
                f"were not committed; {self.committed} items of this call were committed before them") from exc
        inserted, replaced = result[0], result[1]
        self.committed += inserted + replaced
        self.inserted += inserted
        self.replaced += replaced
        return result

    def run(self, items: Iterable[UpsertItem]) -> UpsertResult:
        """The whole call at once, for a caller that holds every item (the servicer
        drives add/flush/finish itself, awaiting the writes)."""
        for item in items:
            if self.add(item):
                if self.failed:
                    break
                self.flush()
        return self.finish()

    def finish(self) -> UpsertResult:
        self.flush()
        if self.failure is not None:
            raise _with_progress(self.failure, self.committed) from None
        return UpsertResult(self.committed, self.inserted, self.replaced)
