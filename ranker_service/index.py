"""The in-memory gallery: per collection, one contiguous float32 matrix of unit
vectors plus its names; cosine top-k by one BLAS product. No SQLite, no gRPC.
This module holds the `exact` float32 kind (`Collection`); the other kinds
(`exact` float16, `hnsw`, `ivf_pq`) are `faiss_collection.FaissCollection`,
with the same interface; `make_collection` picks one for an `IndexSpec`.

Concurrency (why a readers-writer lock, not copy-on-write)
-----------------------------------------------------------
Searches read `matrix[:n]` and `names`; writes replace rows in place, append
rows and compact deletions by moving the last row into the hole. A search
must never see a row half overwritten, nor a names list out of step with the
matrix. Copy-on-write would give lock-free reads, but a replace or a delete
touches rows *inside* `[:n]`, so every write would copy the whole matrix
(512 MB at 100k x 1280): an O(n) write, and twice the memory while it runs.
A readers-writer lock keeps writes O(batch): searches hold the read lock for
their product and selection (many at once: numpy releases the GIL), a write
holds the write lock only while it copies its own batch of rows and fixes the
names (microseconds to a millisecond). The one O(n) step, growing the matrix,
happens *outside* the write lock: the writer (alone, under the collection's
write mutex) copies the old rows into the bigger matrix while searches go on
reading the old one, and only the swap of the two takes the write lock. The
lock prefers writers, so a stream of searches cannot starve an upsert.

Memory
------
Rows live in one C-contiguous `(capacity, dim)` float32 array. Appends grow it
geometrically by 1/16 (at least 64 rows): amortised O(1) copies per append
with at most ~6% slack; the slack rows come from `np.empty`, so the pages of
a large matrix are not even resident until written. Deletions swap the last
row into the hole; when slack passes 1/8 the matrix shrinks back.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from imagesearch import errors
from ranker_service.attributes import AttributeFilter
from ranker_service.faiss_collection import FaissCollection
from ranker_service.filtering import filtered_search
from ranker_service.kinds import EXACT, IndexSpec
from ranker_service.ranking import score_margin, select_top_k
from ranker_service.reranking import Expansion, KReciprocal
from ranker_service.rwlock import ReadWriteLock
from ranker_service.vectors import MAX_TOP_K, check_collection, check_top_k, unit_vector

GROWTH_DIVISOR = 16     # grow by capacity/16 ...
MIN_GROWTH_ROWS = 64    # ... but at least this many rows
SHRINK_DIVISOR = 8      # shrink when slack exceeds count/8 (and MIN_GROWTH_ROWS)


def grown_capacity(needed: int) -> int:
    return needed + max(MIN_GROWTH_ROWS, needed // GROWTH_DIVISOR)


@dataclasses.dataclass(frozen=True)
class Match:
    rank: int  # 1-based
    name: str
    score: float  # cosine similarity (float64 computed)
    attributes: Mapping[str, str] = dataclasses.field(default_factory=dict)  # when the query asked for them


@dataclasses.dataclass(frozen=True)
class Query:
    collection: str
    vector: Sequence[float] | np.ndarray
    top_k: int = 0  # 0 = default
    fingerprint: str = ""  # "" = no check
    id: str = ""
    filters: tuple[AttributeFilter, ...] = ()  # checked (attributes.check_filters)
    with_attributes: bool = False
    expansion: Expansion | None = None  # alpha-weighted query expansion (reranking.py)
    k_reciprocal: KReciprocal | None = None  # k-reciprocal re-ranking (reranking.py)
    deadline: float | None = None  # time.monotonic() by which the caller wants its answer (None: no limit)

    @property
    def reranked(self) -> bool:
        return self.expansion is not None or self.k_reciprocal is not None


@dataclasses.dataclass(frozen=True)
class CollectionStats:
    name: str
    count: int
    dim: int
    fingerprint: str
    memory_bytes: int
    created_at: float
    updated_at: float
    spec: IndexSpec = dataclasses.field(default_factory=IndexSpec)
    derived: object | None = None  # derived.DerivedStatus: re-ranking data current or being rebuilt (SQLite backend)


def make_collection(name: str, dim: int, fingerprint: str, spec: IndexSpec | None = None, *,
                    created_at: float | None = None, updated_at: float | None = None, capacity: int = 0,
                    files_dir: Path | None = None):
    """An empty collection of the spec's kind: `Collection` for exact float32,
    `FaissCollection` for the others."""
    spec = spec or IndexSpec()
    if spec.kind == EXACT and not spec.float16:
        return Collection(name, dim, fingerprint, created_at=created_at, updated_at=updated_at, capacity=capacity,
                          spec=spec)
    return FaissCollection(name, dim, fingerprint, spec, created_at=created_at, updated_at=updated_at,
                           capacity=capacity, files_dir=files_dir)


def describe_query(query: Query, position: int | None = None) -> str:
    if query.id:
        return f"query {query.id!r}"
    return "query" if position is None else f"query #{position}"


class Collection:
    """One collection's vectors in memory. Thread-safe; see the module docstring."""

    spec = IndexSpec()
    dead = 0
    build_seconds = 0.0  # rows go straight into the matrix: nothing to build

    def __init__(self, name: str, dim: int, fingerprint: str, *, created_at: float | None = None,
                 updated_at: float | None = None, capacity: int = 0, spec: IndexSpec | None = None):
        if dim <= 0:
            raise ValueError(f"dimension must be positive, got {dim}")
        now = time.time()
        if spec is not None:
            self.spec = spec  # exact float32, with or without database-side augmentation
        self.name = name
        self.dim = int(dim)
        self.fingerprint = fingerprint
        self.created_at = now if created_at is None else created_at
        self.updated_at = self.created_at if updated_at is None else updated_at
        self.margin = score_margin(self.dim)
        self._matrix = np.empty((capacity, self.dim), dtype=np.float32)
        # Fault the pages in now, in one sequential pass: first-touching them a
        # row at a time while loading costs about ten times more.
        self._matrix.fill(0)
        self._n = 0
        self._names: list[str] = []
        self._rows: dict[str, int] = {}
        self._names_bytes = 0
        self._rw = ReadWriteLock()
        self._write_mutex = threading.Lock()

    @classmethod
    def restore(cls, name: str, dim: int, fingerprint: str, matrix: np.ndarray, names: list[str], *,
                created_at: float, updated_at: float, spec: IndexSpec | None = None) -> Collection:
        """A collection over a loaded (n, dim) float32 matrix (see index_files;
        also the read-only view of a collection's augmented vectors)."""
        coll = cls(name, dim, fingerprint, created_at=created_at, updated_at=updated_at, spec=spec)
        coll._matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        coll._n = matrix.shape[0]
        coll._names = list(names)
        coll._rows = dict(zip(coll._names, range(coll._n)))
        if len(coll._rows) != coll._n:
            raise ValueError(f"collection {name!r}: {coll._n} rows, {len(coll._rows)} distinct names")
        coll._names_bytes = sum(sys.getsizeof(n) for n in names)
        return coll

    def finish_load(self) -> None:
        """Nothing to do: rows went straight into the matrix."""

    def close(self) -> None:
        """Nothing to release."""

    def snapshot_view(self) -> tuple[np.ndarray, list[str]]:
        """(matrix[:n] without a copy, names) for saving; the caller keeps writers out."""
        return self._matrix[: self._n], self._names

    # ------------------------------------------------------------ reading

    def __len__(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return self._matrix.shape[0]

    def __contains__(self, name: str) -> bool:
        with self._rw.read():
            return name in self._rows

    def names(self) -> list[str]:
        with self._rw.read():
            return list(self._names)

    def vector(self, name: str) -> np.ndarray:
        """A copy of the stored unit vector of `name` (KeyError if absent)."""
        with self._rw.read():
            return self._matrix[self._rows[name]].copy()

    def snapshot(self) -> tuple[np.ndarray, list[str]]:
        """Copies of (matrix[:n], names), consistent with each other."""
        with self._rw.read():
            return self._matrix[: self._n].copy(), list(self._names)

    def memory_bytes(self) -> int:
        """Matrix (whole capacity) + names list + name->row dict + the name strings."""
        with self._rw.read():
            return (self._matrix.nbytes + sys.getsizeof(self._names) + sys.getsizeof(self._rows)
                    + self._names_bytes)

    def stats(self) -> CollectionStats:
        return CollectionStats(self.name, len(self), self.dim, self.fingerprint, self.memory_bytes(),
                               self.created_at, self.updated_at, self.spec)

    def search(self, queries64: np.ndarray, top_ks: Sequence[int]) -> list[list[tuple[str, float]]]:
        """Top-k of each row of `queries64` ((b, dim) float64 unit vectors, already
        checked): one float32 matrix-vector (b = 1) or matrix-matrix product."""
        queries64 = np.atleast_2d(queries64)
        if queries64.shape[1] != self.dim or queries64.shape[0] != len(top_ks):
            raise ValueError(f"queries of shape {queries64.shape} for dim {self.dim} and {len(top_ks)} top_k values")
        q32 = queries64.astype(np.float32)
        with self._rw.read():
            n = self._n
            if n == 0:
                return [[] for _ in top_ks]
            matrix = self._matrix[:n]
            if q32.shape[0] == 1:
                scores = (matrix @ q32[0])[np.newaxis]
            else:
                scores = q32 @ matrix.T
            return [select_top_k(scores[i], matrix, self._names, queries64[i], int(k), self.margin)
                    for i, k in enumerate(top_ks)]

    def search_among(self, query64: np.ndarray, k: int, names: Iterable[str]) -> list[tuple[str, float]]:
        """Top-k of one query over the rows of `names` only (names not in the
        collection are ignored): an exact scan of just those rows."""
        q32 = query64.astype(np.float32)
        with self._rw.read():
            rows = np.fromiter((r for r in map(self._rows.get, names) if r is not None), dtype=np.intp)
            if rows.size == 0:
                return []
            rows.sort()  # in memory order
            sub = self._matrix[rows]
            return select_top_k(sub @ q32, sub, _Picked(self._names, rows), query64, int(k), self.margin)

    # ------------------------------------------------------------ writing

    def load_row(self, name: str, vector: np.ndarray) -> None:
        """Start-up loading: append one stored row straight into the
        preallocated matrix (grows only if the capacity given was too small)."""
        with self._write_mutex:
            if name in self._rows:
                raise ValueError(f"collection {self.name!r}: name {name!r} loaded twice")
            if self._n == self.capacity:
                self._resize(grown_capacity(self._n + 1))
            self._matrix[self._n] = vector
            self._append_name(name)

    def upsert(self, names: Sequence[str], vectors32: np.ndarray, updated_at: float | None = None) -> tuple[int, int]:
        """Insert or replace rows (the last of repeated names wins). `vectors32`
        is (len(names), dim) float32 unit rows. Returns (inserted, replaced)."""
        vectors32 = np.asarray(vectors32, dtype=np.float32)
        if vectors32.ndim != 2 or vectors32.shape != (len(names), self.dim):
            raise ValueError(f"{len(names)} names with vectors of shape {vectors32.shape} for dim {self.dim}")
        with self._write_mutex:
            last: dict[str, int] = {}
            for j, name in enumerate(names):
                last[name] = j
            new_names, new_src, old_rows, old_src = [], [], [], []
            for name, j in last.items():
                row = self._rows.get(name)
                if row is None:
                    new_names.append(name)
                    new_src.append(j)
                else:
                    old_rows.append(row)
                    old_src.append(j)
            n = self._n
            needed = n + len(new_names)
            matrix = self._matrix
            if needed > matrix.shape[0]:
                # The O(n) copy runs outside the write lock: searches keep
                # reading the old matrix; no other writer exists (write mutex).
                bigger = np.empty((grown_capacity(needed), self.dim), dtype=np.float32)
                bigger[:n] = matrix[:n]
                matrix = bigger
            with self._rw.write():
                if old_rows:
                    matrix[old_rows] = vectors32[old_src]
                if new_names:
                    matrix[n:needed] = vectors32[new_src]
                self._matrix = matrix
                for name in new_names:
                    self._append_name(name)
                if updated_at is not None:
                    self.updated_at = updated_at
            return len(new_names), len(names) - len(new_names)

    def delete(self, names: Iterable[str], updated_at: float | None = None) -> list[str]:
        """Remove names (compacting: the last row moves into the hole).
        Returns the names that were removed."""
        removed = []
        with self._write_mutex:
            with self._rw.write():
                for name in names:
                    row = self._rows.pop(name, None)
                    if row is None:
                        continue
                    last = self._n - 1
                    if row != last:
                        moved = self._names[last]
                        self._matrix[row] = self._matrix[last]
                        self._names[row] = moved
                        self._rows[moved] = row
                    self._names.pop()
                    self._n = last
                    self._names_bytes -= sys.getsizeof(name)
                    removed.append(name)
                if updated_at is not None and removed:
                    self.updated_at = updated_at
            if self.capacity - self._n > max(MIN_GROWTH_ROWS, self._n // SHRINK_DIVISOR):
                self._resize(grown_capacity(self._n) if self._n else 0)
        return removed

    # The FAISS kinds rebuild in the background (faiss_collection.py); this kind never rebuilds.
    def start_upkeep(self) -> None:
        pass

    def stop_background(self) -> None:
        pass

    def wait_background(self, timeout: float | None = None) -> bool:
        return True

    rebuilding = False
    swaps = 0

    def first_nonfinite(self, chunk_rows: int = 4096) -> str | None:
        """The name of the first row holding NaN/Inf (a damaged database), or None.
        A block's sum is finite exactly when its (unit, so bounded) values are,
        so the scan allocates no temporary arrays."""
        with self._rw.read():
            for start in range(0, self._n, chunk_rows):
                block = self._matrix[start:min(start + chunk_rows, self._n)]
                if not np.isfinite(block.sum(dtype=np.float64)):
                    for offset, row in enumerate(block):
                        if not np.isfinite(row.sum(dtype=np.float64)):
                            return self._names[start + offset]
        return None

    def _append_name(self, name: str) -> None:
        self._rows[name] = self._n
        self._names.append(name)
        self._names_bytes += sys.getsizeof(name)
        self._n += 1

    def _resize(self, capacity: int) -> None:
        """Caller holds the write mutex: copy outside the write lock, swap inside."""
        matrix = np.empty((capacity, self.dim), dtype=np.float32)
        matrix[: self._n] = self._matrix[: self._n]
        with self._rw.write():
            self._matrix = matrix


class _Picked:
    """names[rows[i]] without building the list (only candidates are looked up)."""

    def __init__(self, names: list[str], rows: np.ndarray):
        self._names, self._rows = names, rows

    def __getitem__(self, i: int) -> str:
        return self._names[self._rows[i]]

    def __len__(self) -> int:
        return self._rows.shape[0]


class GalleryIndex:
    """All collections in memory: validated search over them. Thread-safe."""

    def __init__(self, files_dir: Path | None = None) -> None:
        self._collections: dict[str, Collection | FaissCollection] = {}
        self._lock = threading.Lock()
        self.files_dir = files_dir  # where ivf_pq keeps its on-disk rows (a temporary folder if None)

    def __contains__(self, collection: str) -> bool:
        return collection in self._collections

    def collection_names(self) -> list[str]:
        return sorted(self._collections)

    def get(self, collection: str) -> Collection:
        try:
            return self._collections[collection]
        except KeyError:
            known = sorted(self._collections)
            listing = ", ".join(repr(c) for c in known[:10]) + (" ..." if len(known) > 10 else "")
            raise errors.NotFound(
                f"unknown collection {collection!r} (known: {listing or 'none yet'})") from None

    def find(self, collection: str) -> Collection | None:
        return self._collections.get(collection)

    def create(self, collection: str, dim: int, fingerprint: str, spec: IndexSpec | None = None, *,
               created_at: float | None = None, updated_at: float | None = None, capacity: int = 0):
        coll = make_collection(collection, dim, fingerprint, spec, created_at=created_at, updated_at=updated_at,
                               capacity=capacity, files_dir=self.files_dir)
        return self.add(coll)

    def add(self, coll):
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

    def collections(self) -> list:
        return [self._collections[name] for name in sorted(self._collections)]

    def upsert(self, collection: str, names: Sequence[str], vectors32: np.ndarray, fingerprint: str = "",
               updated_at: float | None = None, spec: IndexSpec | None = None) -> tuple[int, int]:
        """Rows into a collection, created on first use with these vectors'
        dimension and this fingerprint (no validation here: `Gallery` validates
        before it commits; this is the memory half of a committed write)."""
        vectors32 = np.asarray(vectors32, dtype=np.float32)
        coll = self._collections.get(collection)
        if coll is None:
            with self._lock:
                coll = self._collections.get(collection)
                if coll is None:
                    coll = make_collection(collection, vectors32.shape[1], fingerprint, spec, created_at=updated_at,
                                           updated_at=updated_at, files_dir=self.files_dir)
                    self._collections[collection] = coll
        return coll.upsert(names, vectors32, updated_at)

    # ------------------------------------------------------------ search

    def prepare(self, query: Query, what: str) -> tuple[Collection, np.ndarray, int]:
        """Validate a query: (collection, float64 unit query, k). Raises the
        domain error that fits (InvalidArgument, NotFound, FailedPrecondition)."""
        k = check_top_k(query.top_k, what=what)
        check_collection(query.collection, what=what)
        coll = self.get(query.collection)
        if query.fingerprint and query.fingerprint != coll.fingerprint:
            raise errors.FailedPrecondition(
                f"{what}: fingerprint {query.fingerprint!r} differs from collection {coll.name!r}'s "
                f"{coll.fingerprint!r}: the query vector comes from another model (or preprocessing)")
        vector = unit_vector(query.vector, what=what, dim=coll.dim)
        return coll, vector, k

    def search(self, query: Query, what: str | None = None, allowed: set[str] | None = None) -> list[Match]:
        """`allowed`: when not None, only these names are ranked (the names
        that pass the query's filters)."""
        coll, vector, k = self.prepare(query, what or describe_query(query))
        if allowed is not None:
            found = filtered_search(coll, vector, k, allowed)
        else:
            (found,) = coll.search(vector[np.newaxis], [k])
        return [Match(rank, name, score) for rank, (name, score) in enumerate(found, 1)]

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
                found = filtered_search(coll, vector, k, allowed[i])
                results[i] = [Match(rank, name, score) for rank, (name, score) in enumerate(found, 1)]
                continue
            group = groups.setdefault(coll.name, (coll, [], [], []))
            group[1].append(i)
            group[2].append(vector)
            group[3].append(k)
        for coll, positions, vectors, ks in groups.values():
            found = coll.search(np.stack(vectors), ks)
            for i, matches in zip(positions, found):
                results[i] = [Match(rank, name, score) for rank, (name, score) in enumerate(matches, 1)]
        return results

    # ------------------------------------------------------------ stats

    def stats(self, collection: str | None = None) -> list[CollectionStats]:
        if collection:
            return [self.get(collection).stats()]
        return [self._collections[name].stats() for name in sorted(self._collections)]

    @property
    def max_top_k(self) -> int:
        return MAX_TOP_K
