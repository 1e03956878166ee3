"""What every in-memory index kind provides (`Collection`), and the state
they share (`CollectionBase`). The kinds: exact.py (`exact` float32) and
faiss.py (`exact` float16, `hnsw`, `ivf_pq`); registry.make_collection picks
one for an IndexSpec.

Locking, in every kind: one writer at a time (a write mutex), and a
readers-writer lock (rwlock.py) around every change a search could see;
searches hold only the read lock. A collection keeps no SQLite and no gRPC:
the SQLite backend commits a write, then applies it here.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from ranker_service.topk import score_margin
from ranker_service.types import CollectionStats, IndexSpec

Found = list[tuple[str, float]]  # (name, float64 cosine) best first, ties by name


class Collection(Protocol):
    name: str
    dim: int
    fingerprint: str
    spec: IndexSpec
    created_at: float
    updated_at: float
    swaps: int  # background rebuilds swapped in (index files are written again after one)
    build_seconds: float  # time spent building the index (logs, benchmarks)

    def __len__(self) -> int: ...

    def __contains__(self, name: str) -> bool: ...

    def names(self) -> list[str]: ...

    def vector(self, name: str) -> np.ndarray:
        """A copy of the stored float32 unit vector of `name` (KeyError if absent)."""

    def snapshot(self) -> tuple[np.ndarray, list[str]]:
        """Copies of (the float32 rows, their names), consistent with each other."""

    def memory_bytes(self) -> int: ...

    def stats(self) -> CollectionStats: ...

    def search(self, queries64: np.ndarray, top_ks: Sequence[int]) -> list[Found]:
        """Top-k of each row of `queries64` ((b, dim) float64 unit vectors, already checked)."""

    def search_among(self, query64: np.ndarray, k: int, names: Iterable[str]) -> Found:
        """The exact top-k of one query over the rows of `names` only (unknown names ignored)."""

    def search_filtered(self, query64: np.ndarray, k: int, names: Iterable[str]) -> Found | None:
        """The top-k among `names` through the index itself (ANN kinds; None: it cannot, see filtering.py)."""

    def load_row(self, name: str, vector: np.ndarray) -> None:
        """Start-up loading, one stored row at a time; `finish_load` at the end."""

    def finish_load(self) -> None: ...

    def first_nonfinite(self) -> str | None:
        """The name of a loaded row holding NaN or Inf (a damaged database), or None."""

    def upsert(self, names: Sequence[str], vectors32: np.ndarray, updated_at: float | None = None) -> tuple[int, int]:
        """Insert or replace rows (the last of repeated names wins): (inserted, replaced)."""

    def delete(self, names: Iterable[str], updated_at: float | None = None) -> list[str]:
        """Remove names; the names that were removed."""

    def rename(self, renamings: Sequence[tuple[str, str]], updated_at: float | None = None) -> None:
        """Give rows new names, in order (a target present is replaced), as one
        change: a search, a count or a listing sees all of it or none."""

    def start_upkeep(self) -> None:
        """Start a background rebuild if one is due (after a restore from index files)."""

    def stop_background(self) -> None:
        """No more background rebuilds: the running one is cancelled and waited for."""

    def wait_background(self, timeout: float | None = None) -> bool: ...

    def close(self) -> None: ...


class CollectionBase:
    """The identity, times and stats every kind keeps; no background work by default."""

    swaps = 0
    build_seconds = 0.0
    rebuilding = False

    def __init__(self, name: str, dim: int, fingerprint: str, spec: IndexSpec, created_at: float | None,
                 updated_at: float | None):
        if dim <= 0:
            raise ValueError(f"dimension must be positive, got {dim}")
        self.name = name
        self.dim = int(dim)
        self.fingerprint = fingerprint
        self.spec = spec
        self.created_at = time.time() if created_at is None else created_at
        self.updated_at = self.created_at if updated_at is None else updated_at
        self.margin = score_margin(self.dim)

    def stats(self) -> CollectionStats:
        return CollectionStats(self.name, len(self), self.dim, self.fingerprint, self.memory_bytes(),
                               self.created_at, self.updated_at, self.spec)

    def _check_queries(self, queries64: np.ndarray, top_ks: Sequence[int]) -> np.ndarray:
        queries64 = np.atleast_2d(queries64)
        if queries64.shape[1] != self.dim or queries64.shape[0] != len(top_ks):
            raise ValueError(f"queries of shape {queries64.shape} for dim {self.dim} and {len(top_ks)} top_k values")
        return queries64

    def _check_rows(self, names: Sequence[str], vectors32: np.ndarray) -> np.ndarray:
        vectors32 = np.ascontiguousarray(vectors32, dtype=np.float32)
        if vectors32.ndim != 2 or vectors32.shape != (len(names), self.dim):
            raise ValueError(f"{len(names)} names with vectors of shape {vectors32.shape} for dim {self.dim}")
        return vectors32

    def search_filtered(self, query64: np.ndarray, k: int, names: Iterable[str]) -> Found | None:
        return None

    def start_upkeep(self) -> None:
        pass

    def stop_background(self) -> None:
        pass

    def wait_background(self, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        pass


def last_of(names: Sequence[str]) -> dict[str, int]:
    """name -> the position of its last occurrence (the one a write keeps), in first-seen order."""
    last: dict[str, int] = {}
    for j, name in enumerate(names):
        last[name] = j
    return last
