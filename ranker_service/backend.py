"""The one interface the servicer uses, whichever backend holds the vectors.

`Gallery` (SQLite + in-memory indexes, `--backend sqlite`, the default) and
`MilvusGallery` (`--backend milvus`) both provide it; the backend-agnostic
tests (tests/test_ranker_backends.py) run against both.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Protocol

from imagesearch import errors
from ranker_service.attributes import AttributeFilter
from ranker_service.backup import BackupCopy
from ranker_service.gallery import DeleteResult, ItemPage, LoadReport, RenameResult, UpsertItem, UpsertJob, UpsertResult
from ranker_service.index import CollectionStats, Match, Query
from ranker_service.kinds import IndexSpec

BACKENDS = ("sqlite", "milvus")


class RankerBackend(Protocol):
    @property
    def ready(self) -> bool: ...

    def load(self) -> LoadReport: ...

    def close(self) -> None: ...

    def upsert(self, items: Iterable[UpsertItem]) -> UpsertResult: ...

    def upsert_job(self) -> UpsertJob:
        """An upsert fed one item at a time (the async servicer reads its stream
        without a thread): `add(item) -> flush due`, `failed`, `fail(exc)`,
        `flush()` and `finish() -> UpsertResult` (those two block)."""

    def delete(self, collection: str, names: Sequence[str]) -> DeleteResult: ...

    def search(self, query: Query) -> list[Match]: ...

    def search_many(self, queries: Sequence[Query]) -> list[list[Match] | errors.ImageSearchError]: ...

    def derived_pending(self, query: Query) -> Future | None:
        """None when the derived re-ranking data the query needs is current
        (or it needs none); else a future done once it is (ranker_service/derived.py)."""

    def stats(self, collection: str | None = None) -> list[CollectionStats]: ...

    def create_collection(self, collection: str, dim: int, fingerprint: str,
                          spec: IndexSpec) -> tuple[CollectionStats, bool]: ...

    def drop_collection(self, collection: str) -> int: ...

    def list_items(self, collection: str, *, page_size: int = 0, start_after: str = "", limit: int = 0,
                   filters: Sequence[AttributeFilter] = (), with_vectors: bool = False) -> Iterator[ItemPage]: ...

    def rename(self, collection: str, renamings: Sequence[tuple[str, str]]) -> RenameResult: ...

    def memory_bytes(self) -> int: ...

    def backup(self) -> AbstractContextManager[BackupCopy]:
        """A checked copy of the stored data as one file, deleted on exit."""

    @property
    def max_top_k(self) -> int: ...
