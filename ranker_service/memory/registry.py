"""Every collection in memory, by name (`Registry`), made by `make_collection`
for its IndexSpec; validated search over them. No SQLite, no files of its own
(ivf_pq's rows file lives in `files_dir`), no gRPC.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from imagesearch import errors
from ranker_service.memory.collection import Collection, Found
from ranker_service.memory.exact import ExactCollection
from ranker_service.memory.faiss import FaissCollection
from ranker_service.memory.filtering import filtered_search
from ranker_service.types import EXACT, CollectionStats, IndexSpec, Match, Query
from ranker_service.validation import check_query, describe_query, query_vector, unknown_collection

OnRowsReplaced = Callable[[str], None]  # told a collection's name when a rebuild replaced ivf_pq's rows file


def make_collection(name: str, dim: int, fingerprint: str, spec: IndexSpec | None = None, *,
                    created_at: float | None = None, updated_at: float | None = None, capacity: int = 0,
                    files_dir: Path | None = None, on_rows_replaced: OnRowsReplaced | None = None) -> Collection:
    """An empty collection of the spec's kind: ExactCollection for exact float32, FaissCollection for the others."""
    spec = spec or IndexSpec()
    if spec.kind == EXACT and not spec.float16:
        return ExactCollection(name, dim, fingerprint, created_at=created_at, updated_at=updated_at,
                               capacity=capacity)
    return FaissCollection(name, dim, fingerprint, spec, created_at=created_at, updated_at=updated_at,
                           capacity=capacity, files_dir=files_dir, on_rows_replaced=on_rows_replaced)


def matches(found: Found) -> list[Match]:
    return [Match(rank, name, score) for rank, (name, score) in enumerate(found, 1)]


class Registry:
    """All collections in memory: validated search over them. Thread-safe."""

    def __init__(self, files_dir: Path | None = None, on_rows_replaced: OnRowsReplaced | None = None) -> None:
        self._collections: dict[str, Collection] = {}
        self._lock = threading.Lock()
        self.files_dir = files_dir  # where ivf_pq keeps its on-disk rows (a temporary folder if None)
        self.on_rows_replaced = on_rows_replaced

    def __contains__(self, collection: str) -> bool:
        return collection in self._collections

    def collection_names(self) -> list[str]:
        return sorted(self._collections)

    def get(self, collection: str) -> Collection:
        try:
            return self._collections[collection]
        except KeyError:
            raise unknown_collection(collection, self._collections) from None

    def find(self, collection: str) -> Collection | None:
        return self._collections.get(collection)

    def create(self, collection: str, dim: int, fingerprint: str, spec: IndexSpec | None = None, *,
               created_at: float | None = None, updated_at: float | None = None, capacity: int = 0) -> Collection:
        return self.add(self._make(collection, dim, fingerprint, spec, created_at=created_at, updated_at=updated_at,
                                   capacity=capacity))

    def _make(self, *args, **kwargs) -> Collection:
        return make_collection(*args, **kwargs, files_dir=self.files_dir, on_rows_replaced=self.on_rows_replaced)

    def add(self, coll: Collection) -> Collection:
        """Register a built collection (start-up loading, CreateCollection)."""
        with self._lock:
            if coll.name in self._collections:
                raise ValueError(f"collection {coll.name!r} exists already")
            self._collections[coll.name] = coll
            return coll

    def drop(self, collection: str) -> None:
        with self._lock:
            coll = self._collections.pop(collection, None)
        if coll is not None:
            coll.close()

    def stop_background(self) -> None:
        """Cancel and wait for every background rebuild (before saving index files at a stop)."""
        for coll in self.collections():
            coll.stop_background()

    def collections(self) -> list[Collection]:
        return [self._collections[name] for name in sorted(self._collections)]

    def upsert(self, collection: str, names: Sequence[str], vectors32: np.ndarray, fingerprint: str = "",
               updated_at: float | None = None, spec: IndexSpec | None = None) -> tuple[int, int]:
        """Rows into a collection, created on first use with these vectors'
        dimension and this fingerprint (no validation here: the backend validates
        before it commits; this is the memory half of a committed write)."""
        vectors32 = np.asarray(vectors32, dtype=np.float32)
        coll = self._collections.get(collection)
        if coll is None:
            with self._lock:
                coll = self._collections.get(collection)
                if coll is None:
                    coll = self._make(collection, vectors32.shape[1], fingerprint, spec, created_at=updated_at,
                                      updated_at=updated_at)
                    self._collections[collection] = coll
        return coll.upsert(names, vectors32, updated_at)

    # ------------------------------------------------------------ search

    def prepare(self, query: Query, what: str) -> tuple[Collection, np.ndarray, int]:
        """Validate a query: (collection, float64 unit query, k). Raises the
        domain error that fits (InvalidArgument, NotFound, FailedPrecondition)."""
        k = check_query(query, what)
        coll = self.get(query.collection)
        return coll, query_vector(query, what, coll.name, coll.dim, coll.fingerprint), k

    def search(self, query: Query, what: str | None = None, allowed: set[str] | None = None) -> list[Match]:
        """`allowed`: when not None, only these names are ranked (the names
        that pass the query's filters)."""
        coll, vector, k = self.prepare(query, what or describe_query(query))
        if allowed is not None:
            found = filtered_search(coll, vector, k, allowed)
        else:
            (found,) = coll.search(vector[np.newaxis], [k])
        return matches(found)

    def search_many(self, queries: Sequence[Query], allowed: Sequence[set[str] | None] | None = None,
                    ) -> list[list[Match] | errors.ImageSearchError]:
        """Each query's matches, or the domain error it failed with. Valid
        unfiltered queries on one collection share one matrix-matrix product;
        a query with `allowed[i]` not None ranks only those names."""
        results: list[list[Match] | errors.ImageSearchError] = [[] for _ in queries]
        groups: dict[str, tuple[Collection, list[int], list[np.ndarray], list[int]]] = {}
        for i, query in enumerate(queries):
            try:
                coll, vector, k = self.prepare(query, describe_query(query, i))
            except errors.ImageSearchError as exc:
                results[i] = exc
                continue
            if allowed is not None and allowed[i] is not None:
                results[i] = matches(filtered_search(coll, vector, k, allowed[i]))
                continue
            group = groups.setdefault(coll.name, (coll, [], [], []))
            group[1].append(i)
            group[2].append(vector)
            group[3].append(k)
        for coll, positions, vectors, ks in groups.values():
            found = coll.search(np.stack(vectors), ks)
            for i, one in zip(positions, found):
                results[i] = matches(one)
        return results

    # ------------------------------------------------------------ stats

    def stats(self, collection: str | None = None) -> list[CollectionStats]:
        if collection:
            return [self.get(collection).stats()]
        return [self._collections[name].stats() for name in sorted(self._collections)]
