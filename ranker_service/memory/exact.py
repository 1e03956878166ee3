"""The `exact` float32 kind: one contiguous float32 matrix of unit vectors
plus its names; cosine top-k by one BLAS product (topk.py).

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

Memory layout and growth: docs/ranker.md#memory.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Sequence

import numpy as np

from ranker_service.memory.collection import CollectionBase, last_of
from ranker_service.memory.rwlock import ReadWriteLock
from ranker_service.topk import select_top_k
from ranker_service.types import IndexSpec

GROWTH_DIVISOR = 16     # grow by capacity/16 ...
MIN_GROWTH_ROWS = 64    # ... but at least this many rows
SHRINK_DIVISOR = 8      # shrink when slack exceeds count/8 (and MIN_GROWTH_ROWS)


def grown_capacity(needed: int) -> int:
    return needed + max(MIN_GROWTH_ROWS, needed // GROWTH_DIVISOR)


class ExactCollection(CollectionBase):
    """One collection's vectors in memory. Thread-safe; see the module docstring."""

    dead = 0

    def __init__(self, name: str, dim: int, fingerprint: str, *, created_at: float | None = None,
                 updated_at: float | None = None, capacity: int = 0):
        super().__init__(name, dim, fingerprint, IndexSpec(), created_at, updated_at)
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
                created_at: float, updated_at: float) -> ExactCollection:
        """A collection over a loaded (n, dim) float32 matrix (sqlite/snapshots.py)."""
        coll = cls(name, dim, fingerprint, created_at=created_at, updated_at=updated_at)
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

    def search(self, queries64: np.ndarray, top_ks: Sequence[int]) -> list[list[tuple[str, float]]]:
        """Top-k of each row of `queries64` ((b, dim) float64 unit vectors, already
        checked): one float32 matrix-vector (b = 1) or matrix-matrix product."""
        queries64 = self._check_queries(queries64, top_ks)
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
            names = [self._names[r] for r in rows.tolist()]
            return select_top_k(sub @ q32, sub, names, query64, int(k), self.margin)

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
        vectors32 = self._check_rows(names, vectors32)
        with self._write_mutex:
            last = last_of(names)
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
        with self._write_mutex:
            with self._rw.write():
                removed = [name for name in names if self._remove(name)]
                if updated_at is not None and removed:
                    self.updated_at = updated_at
            if self.capacity - self._n > max(MIN_GROWTH_ROWS, self._n // SHRINK_DIVISOR):
                self._resize(grown_capacity(self._n) if self._n else 0)
        return removed

    def _remove(self, name: str) -> bool:
        """Remove one row, the last row moving into its hole (caller holds the write lock)."""
        row = self._rows.pop(name, None)
        if row is None:
            return False
        last = self._n - 1
        if row != last:
            moved = self._names[last]
            self._matrix[row] = self._matrix[last]
            self._names[row] = moved
            self._rows[moved] = row
        self._names.pop()
        self._n = last
        self._names_bytes -= sys.getsizeof(name)
        return True

    def rename(self, renamings: Sequence[tuple[str, str]], updated_at: float | None = None) -> None:
        with self._write_mutex, self._rw.write():
            for old, new in renamings:
                if old == new or old not in self._rows:
                    continue
                self._remove(new)  # a target present is replaced
                row = self._rows.pop(old)
                self._rows[new] = row
                self._names[row] = new
                self._names_bytes += sys.getsizeof(new) - sys.getsizeof(old)
            if updated_at is not None:
                self.updated_at = updated_at

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
