"""The one interface the servicer uses, whichever backend holds the vectors
(`RankerBackend`), and the Upsert job both backends build on (`UpsertJob`).

`SqliteBackend` (sqlite/backend.py: SQLite + in-memory indexes, `--backend
sqlite`, the default) and `MilvusBackend` (milvus/, `--backend milvus`)
both provide it; the backend-agnostic tests (tests/test_ranker_backends.py)
run against both.

An Upsert call is fed an item at a time: the async servicer reads its stream
without a thread. `add(item)` is quick (validation) and returns True when
`flush()` is due, or, with `failed` set, when an invalid item ended the call;
`flush()` and `finish()` write. The base keeps what both backends count and
say: how many items were committed, the failure that ended the call, and the
messages that name the items not committed. A backend gives `_prepare`
(check one item), `_due` (flush now?) and `flush` (commit what is queued,
through `_commit_batch`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Protocol

from imagesearch import errors
from imagesearch.defaults import MAX_TOP_K
from imagesearch.errors import shorten
from ranker_service.aliases import AliasTable
from ranker_service.types import (
    AttributeFilter,
    BackupCopy,
    CollectionStats,
    DeleteResult,
    IndexSpec,
    ItemPage,
    LoadReport,
    Match,
    Pending,
    Query,
    RenameResult,
    UpsertItem,
    UpsertResult,
)

BACKENDS = ("sqlite", "milvus")
_deadline = threading.local()
DEFAULT_BATCH_SIZE = 256  # Upsert items per commit


class RankerBackend(Protocol):
    aliases: AliasTable  # aliases of collections; the servicer resolves every name through it

    @property
    def ready(self) -> bool: ...

    def load(self) -> LoadReport: ...

    def close(self) -> None: ...

    def upsert(self, items: Iterable[UpsertItem]) -> UpsertResult: ...

    def upsert_job(self) -> "UpsertJob":
        """An upsert fed one item at a time (the async servicer reads its stream
        without a thread): `add(item) -> flush due`, `failed`, `fail(exc)`,
        `flush()` and `finish() -> UpsertResult` (those two block)."""

    def delete(self, collection: str, names: Sequence[str]) -> DeleteResult: ...

    def search(self, query: Query) -> list[Match]: ...

    def search_many(self, queries: Sequence[Query]) -> list[list[Match] | errors.ImageSearchError]: ...

    def derived_pending(self, query: Query) -> Future | None:
        """None when the derived re-ranking data the query needs is current
        (or it needs none); else a future done once it is (rerank/cache.py)."""

    def stats(self, collection: str | None = None) -> list[CollectionStats]: ...

    def create_collection(self, collection: str, dim: int, fingerprint: str,
                          spec: IndexSpec) -> tuple[CollectionStats, bool]: ...

    def drop_collection(self, collection: str) -> int: ...

    def list_items(self, collection: str, *, page_size: int = 0, start_after: str = "", limit: int = 0,
                   filters: Sequence[AttributeFilter] = (), with_vectors: bool = False) -> Iterator[ItemPage]: ...

    def rename(self, collection: str, renamings: Sequence[tuple[str, str]], in_order: bool = False) -> RenameResult:
        """New names for items, keeping vectors and attributes (validation.check_renamings)."""

    def memory_bytes(self) -> int: ...

    def backup(self) -> AbstractContextManager[BackupCopy]:
        """A checked copy of the stored data as one file, deleted on exit."""

    @property
    def max_top_k(self) -> int: ...


class BackendBase:
    """What both backends keep alike: the batch size, readiness, and `upsert` through the job."""

    LOADING = "the ranker is still loading: retry shortly"  # UNAVAILABLE until `load()` is done

    def __init__(self, batch_size: int):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = batch_size
        self._ready = False
        self._closed = False

    @property
    def ready(self) -> bool:
        return self._ready and not self._closed

    def _require_ready(self) -> None:
        if self._closed:
            raise errors.Unavailable("the ranker is shutting down")
        if not self._ready:
            raise errors.Unavailable(self.LOADING)

    def upsert(self, items: Iterable[UpsertItem]) -> UpsertResult:
        """Check and commit a stream of items in batches (see UpsertJob)."""
        return self.upsert_job().run(items)

    @property
    def max_top_k(self) -> int:
        return MAX_TOP_K


class deadline_of:
    """`with deadline_of(t):` the backend calls this thread makes are for a
    gRPC call due by time.monotonic() `t` (None: no limit). The servicer sets
    it around each blocking call; a backend that waits on another service
    (Milvus) bounds its waits by it (`call_deadline()`)."""

    def __init__(self, deadline: float | None):
        self.deadline = deadline

    def __enter__(self):
        self.outer = getattr(_deadline, "value", None)
        _deadline.value = self.deadline
        return self

    def __exit__(self, *exc):
        _deadline.value = self.outer


def call_deadline() -> float | None:
    """The deadline `deadline_of` set for this thread's current call, or None."""
    return getattr(_deadline, "value", None)


def with_progress(exc: errors.ImageSearchError, committed: int) -> errors.ImageSearchError:
    """The same kind of error, its message ending with the call's progress."""
    return type(exc)(f"{exc} [{committed} items of this call were committed before it; nothing from it on]")


class UpsertJob:
    """See the module docstring; `SqliteBackend.upsert_job` and
    `MilvusBackend.upsert_job` return subclasses."""

    def __init__(self, backend):
        self._backend = backend
        self._pending: list[Pending] = []
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
        return len(self._pending) >= self._backend.batch_size or self._due(p)

    def _prepare(self, index: int, item: UpsertItem) -> Pending:
        """The validated item (a domain error if it is not valid)."""
        raise NotImplementedError

    def _due(self, p: Pending) -> bool:
        """Flush now, before the batch is full?"""
        return False

    def flush(self) -> None:
        raise NotImplementedError

    def _commit_batch(self, batch: list[Pending], commit: Callable[[list[Pending]], tuple]) -> tuple:
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
            raise with_progress(self.failure, self.committed) from None
        return UpsertResult(self.committed, self.inserted, self.replaced)


def not_renamed(renamings: Sequence[tuple[str, str]], done: Sequence[tuple[str, str]]) -> list[str]:
    """The source of every renaming not among `done` (which keeps their order)."""
    left, i = [], 0
    for pair in renamings:
        if i < len(done) and done[i] == pair:
            i += 1
        else:
            left.append(pair[0])
    return left
