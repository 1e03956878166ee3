"""One collection held in a FAISS index: `exact` float16, `hnsw` or `ivf_pq`
(docs/ranker.md#index-kinds).

Every stored version of a vector gets a fresh FAISS id, never reused; a
replacement or a delete marks the old id dead in a bitmap of live ids, which
every search passes to FAISS (`IDSelectorBitmap`): a dead id is never
returned. Candidates are re-ranked in float64 from the stored float32 vectors
(HNSW: its own flat storage; ivf_pq: a float32 file on disk, read with pread;
exact float16: the float16 rows) and sorted by (-score, name). An `ivf_pq`
below `train_size(nlist)` vectors answers by an exact scan of its rows file.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import faiss
import numpy as np

from ranker_service.memory import background
from ranker_service.memory.background import Job
from ranker_service.memory.collection import CollectionBase, Found, last_of
from ranker_service.memory.faiss_build import (
    ADD_CHUNK,
    BUILD_THREADS,
    DiskRows,
    Rebuilds,
    compaction_due,
    new_index,
    train_size,
)
from ranker_service.memory.rwlock import ReadWriteLock
from ranker_service.topk import rank_exact, select_top_k
from ranker_service.types import EXACT, HNSW, IVF_PQ, IndexSpec

# Seconds a background rebuild sleeps after each chunk (background.PAUSE_S,
# IMAGESEARCH_RANKER_REBUILD_PAUSE_S): a throttle; tests hold a rebuild open with it.
REBUILD_PAUSE_S = background.PAUSE_S


def file_stem(collection: str) -> str:
    """The start of the name of every file of a collection (a hash: any name is safe)."""
    return hashlib.sha256(collection.encode("utf-8")).hexdigest()[:32]


class FaissCollection(Rebuilds, CollectionBase):
    """A `Collection` (collection.py) over a FAISS index."""

    def __init__(self, name: str, dim: int, fingerprint: str, spec: IndexSpec, *, created_at: float | None = None,
                 updated_at: float | None = None, capacity: int = 0, files_dir: Path | None = None,
                 rows: DiskRows | None = None, on_rows_replaced: Callable[[str], None] | None = None):
        super().__init__(name, dim, fingerprint, spec, created_at, updated_at)
        self.on_rows_replaced = on_rows_replaced  # a rebuild replaced ivf_pq's rows file (index files go stale)
        self._tmpdir = None
        if files_dir is None and spec.kind == IVF_PQ:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="ranker-ivfpq-")
            files_dir = Path(self._tmpdir.name)
        self.files_dir = files_dir
        self._index = new_index(spec, self.dim)
        self._names_by_id: list[str | None] = []
        self._ids: dict[str, int] = {}
        self._names_bytes = 0
        self._live = np.zeros(max(8, (capacity + 7) // 8), dtype=np.uint8)
        self._dead = 0
        if rows is None and spec.kind == IVF_PQ:
            rows = DiskRows(self.rows_path(files_dir), self.dim)
        self._disk = rows
        self._loading: list[np.ndarray] = []  # rows given ids but not yet added to FAISS (load, ivf_pq untrained)
        self._loading_first = 0
        self._nonfinite: str | None = None
        self.build_seconds = 0.0  # time spent in FAISS adds and training (the build time, for logs and benchmarks)
        self._rw = ReadWriteLock()
        self._write_mutex = threading.Lock()
        # the background rebuild (one at a time; background.py), guarded by the write mutex
        self._upkeep = background.Background(
            f"collection {name!r}", self._write_mutex, self._upkeep_due,
            lambda job: self._rebuild(job, pause=REBUILD_PAUSE_S), thread=f"ranker-rebuild-{name[:32]}",
            failed="background rebuild failed; searches go on with the current index "
                   "(the next start rebuilds from SQLite)")
        self.swaps = 0  # rebuilds swapped in (the backend writes index files again after one)

    def rows_path(self, files_dir: Path) -> Path:
        return files_dir / f"{file_stem(self.name)}.rows.f32"

    @classmethod
    def restore(cls, name: str, dim: int, fingerprint: str, spec: IndexSpec, index, names_by_id: list[str | None],
                rows: DiskRows | None, files_dir: Path, *, created_at: float, updated_at: float,
                on_rows_replaced: Callable[[str], None] | None = None) -> FaissCollection:
        """A collection from its saved index and names (sqlite/snapshots.py)."""
        if index.d != dim or index.ntotal != (len(names_by_id) if spec.kind != IVF_PQ or index.is_trained
                                              else 0):
            if rows is not None:
                rows.close()
            raise ValueError(f"saved index holds {index.ntotal} vectors of dim {index.d}, "
                             f"names {len(names_by_id)}, expected dim {dim}")
        coll = cls(name, dim, fingerprint, spec, created_at=created_at, updated_at=updated_at,
                   capacity=len(names_by_id), files_dir=files_dir, rows=rows, on_rows_replaced=on_rows_replaced)
        coll._index = index
        coll._names_by_id = names_by_id
        total = len(names_by_id)
        if None in names_by_id:
            live = np.fromiter((n is not None for n in names_by_id), dtype=bool, count=total)
            coll._ids = {n: i for i, n in enumerate(names_by_id) if n is not None}
        else:  # the common case, about 5x faster for 1M names
            live = np.ones(total, dtype=bool)
            coll._ids = dict(zip(names_by_id, range(total)))
        packed = np.packbits(live, bitorder="little")
        coll._live[: packed.shape[0]] = packed
        coll._dead = total - len(coll._ids)
        coll._names_bytes = sum(sys.getsizeof(n) for n in coll._ids)
        return coll

    def state(self):
        """(the FAISS index, names by id) for saving; the caller keeps writers
        out and has stopped background rebuilds (`stop_background`)."""
        with self._rw.read():
            return self._index, self._names_by_id

    def flush_rows(self) -> None:
        if self._disk is not None:
            self._disk.flush()

    # ------------------------------------------------------------ reading

    def __len__(self) -> int:
        with self._rw.read():  # a rename changes the id map in two steps
            return len(self._ids)

    def __contains__(self, name: str) -> bool:
        with self._rw.read():
            return name in self._ids

    @property
    def trained(self) -> bool:
        return self._index.is_trained

    @property
    def dead(self) -> int:
        return self._dead

    def names(self) -> list[str]:
        with self._rw.read():
            return list(self._ids)

    def _rows(self, ids: Sequence[int]) -> np.ndarray:
        """float32 rows of these ids (caller holds the read lock)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._disk is not None:
            if ids.shape[0] > 1 and ids[-1] - ids[0] == ids.shape[0] - 1 and bool((np.diff(ids) == 1).all()):
                return self._disk.read_range(int(ids[0]), int(ids[-1]) + 1)  # one pread for a run of ids
            return self._disk.read(ids)
        return self._index.reconstruct_batch(ids)

    def vector(self, name: str) -> np.ndarray:
        with self._rw.read():
            return self._rows([self._ids[name]])[0].copy()

    def snapshot(self) -> tuple[np.ndarray, list[str]]:
        with self._rw.read():
            names = list(self._ids)
            ids = [self._ids[n] for n in names]
            return self._rows(ids) if ids else np.empty((0, self.dim), np.float32), names

    def memory_bytes(self) -> int:
        """An estimate: FAISS codes and graph/lists, plus the names and id maps."""
        with self._rw.read():
            n = self._index.ntotal
            if self.spec.kind == EXACT:
                index_bytes = n * self.dim * 2
            elif self.spec.kind == HNSW:
                index_bytes = n * (self.dim * 4 + self.spec.hnsw_m * 2 * 4 + 16)
            else:
                index_bytes = n * (self.spec.pq_bytes + 8) + self.spec.nlist * self.dim * 4 + 256 * self.dim * 4
            return (index_bytes + self._live.nbytes + sys.getsizeof(self._names_by_id) + sys.getsizeof(self._ids)
                    + self._names_bytes)

    def _selector(self):
        if self._dead == 0:
            return None
        return faiss.IDSelectorBitmap(self._live.shape[0], faiss.swig_ptr(self._live))

    def _params(self, sel, fetch: int):
        if self.spec.kind == HNSW:
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.spec.ef_search, fetch)
        elif self.spec.kind == IVF_PQ:
            params = faiss.SearchParametersIVF()
            params.nprobe = self.spec.nprobe
        else:
            params = faiss.SearchParameters()
        if sel is not None:
            params.sel = sel
        return params

    def search(self, queries64: np.ndarray, top_ks: Sequence[int]) -> list[Found]:
        queries64 = self._check_queries(queries64, top_ks)
        q32 = np.ascontiguousarray(queries64, dtype=np.float32)
        with self._rw.read():
            n = len(self._ids)
            if n == 0:
                return [[] for _ in top_ks]
            kmax = min(max(top_ks), n)
            if self.spec.kind == EXACT:
                fetch = min(n, kmax + max(16, kmax))  # float16 scores pick, float64 over the float16 rows orders
            elif self.spec.rerank:
                fetch = self.spec.candidates(kmax, n)
            else:
                fetch = kmax
            if self._index.is_trained:
                sel = self._selector()
                _, found = self._index.search(q32, fetch, params=self._params(sel, fetch))
            else:
                found = self._scan(q32, fetch)
            return [self._rank(found[i], queries64[i], int(k)) for i, k in enumerate(top_ks)]

    def _scan(self, q32: np.ndarray, fetch: int) -> np.ndarray:
        """Untrained ivf_pq: exact float32 scan of the on-disk rows, dead ids excluded."""
        total = len(self._names_by_id)
        rows = self._disk.read_range(0, total)
        scores = q32 @ rows.T
        alive = np.unpackbits(self._live, bitorder="little")[:total].astype(bool)
        scores[:, ~alive] = -np.inf
        fetch = min(fetch, int(alive.sum()))
        top = np.argpartition(-scores, fetch - 1, axis=1)[:, :fetch]
        return top

    def _rank(self, ids: np.ndarray, query64: np.ndarray, k: int) -> Found:
        ids = [int(i) for i in ids if i >= 0]
        if not ids:
            return []
        names = [self._names_by_id[i] for i in ids]
        if not self.spec.rerank and self.spec.kind != EXACT:
            # FAISS's own order and (approximate) scores are not kept: score the
            # candidates exactly anyway, but only the first k of them.
            ids, names = ids[:k], names[:k]
        return rank_exact(names, self._rows(ids), query64, k)

    def search_among(self, query64: np.ndarray, k: int, names: Iterable[str]) -> Found:
        """Top-k of one query over the rows of `names` only (see filtering.py):
        an exact scan of just those stored rows (from disk for ivf_pq), ranked
        as the exact kind ranks."""
        with self._rw.read():
            picked = [(self._ids[n], n) for n in names if n in self._ids]
            if not picked:
                return []
            picked.sort()
            rows = np.ascontiguousarray(self._rows([i for i, _ in picked]), dtype=np.float32)
            return select_top_k(rows @ query64.astype(np.float32), rows, [n for _, n in picked], query64, int(k),
                                self.margin)

    def search_filtered(self, query64: np.ndarray, k: int, names: Iterable[str]) -> Found | None:
        """Top-k of one query among `names` through the index itself: FAISS
        skips every other id during the search (an `IDSelectorBitmap` of the
        passing ids), then the exact re-rank. None when the index cannot
        search yet (an untrained ivf_pq); it may return fewer than k (the
        caller then scans the passing rows exactly, see filtering.py)."""
        q32 = np.ascontiguousarray(query64[np.newaxis], dtype=np.float32)
        with self._rw.read():
            if not self._index.is_trained:
                return None
            ids = np.fromiter((i for i in map(self._ids.get, names) if i is not None), dtype=np.int64)
            if ids.size == 0:
                return []
            bitmap = np.zeros(self._live.shape[0], dtype=np.uint8)
            np.bitwise_or.at(bitmap, ids >> 3, np.left_shift(1, ids & 7).astype(np.uint8))
            sel = faiss.IDSelectorBitmap(bitmap.shape[0], faiss.swig_ptr(bitmap))
            fetch = min(int(ids.size), self.spec.candidates(k, int(ids.size)) if self.spec.rerank else k)
            _, found = self._index.search(q32, fetch, params=self._params(sel, fetch))
            return self._rank(found[0], query64, int(k))

    def first_nonfinite(self) -> str | None:
        return self._nonfinite  # checked row by row as vectors are loaded (see load_row)

    # ------------------------------------------------------------ writing

    def _give_ids(self, names: Sequence[str]) -> int:
        """Fresh ids for `names` (caller holds the write lock); the old id of a
        name already present dies. Returns the first new id."""
        first = len(self._names_by_id)
        needed = (first + len(names) + 7) // 8
        if needed > self._live.shape[0]:
            bigger = np.zeros(max(needed, 2 * self._live.shape[0]), dtype=np.uint8)
            bigger[: self._live.shape[0]] = self._live
            self._live = bigger
        for offset, name in enumerate(names):
            old = self._ids.get(name)
            if old is not None:
                self._kill(old)
            else:
                self._names_bytes += sys.getsizeof(name)
            new = first + offset
            self._ids[name] = new
            self._names_by_id.append(name)
            self._live[new >> 3] |= np.uint8(1 << (new & 7))
        return first

    def _kill(self, fid: int) -> None:
        self._live[fid >> 3] &= np.uint8(~(1 << (fid & 7)) & 0xFF)
        self._names_by_id[fid] = None
        self._dead += 1

    def _add(self, first_id: int, block: np.ndarray) -> None:
        """Rows with ids first_id.. into FAISS (trained) or to disk only."""
        if self._disk is not None:
            self._disk.write(first_id, block)
        if self._index.is_trained:
            faiss.omp_set_num_threads(BUILD_THREADS)
            t0 = time.perf_counter()
            if self.spec.kind == IVF_PQ:
                self._index.add_with_ids(block, np.arange(first_id, first_id + block.shape[0], dtype=np.int64))
            else:
                self._index.add(block)
            self.build_seconds += time.perf_counter() - t0

    def load_row(self, name: str, vector: np.ndarray) -> None:
        """Start-up loading, buffered: rows reach FAISS in chunks (see finish_load)."""
        if self._nonfinite is None and not np.isfinite(vector.sum(dtype=np.float64)):
            self._nonfinite = name
        with self._write_mutex:
            if name in self._ids:
                raise ValueError(f"collection {self.name!r}: name {name!r} loaded twice")
            if not self._loading:
                self._loading_first = len(self._names_by_id)
            self._give_ids([name])
            self._loading.append(vector)
            if len(self._loading) >= ADD_CHUNK:
                self._flush_loading()

    def _flush_loading(self) -> None:
        if self._loading:
            block = np.stack(self._loading)
            self._loading = []
            self._add(self._loading_first, block)

    def finish_load(self) -> None:
        """End of start-up loading: the last rows into FAISS, and an ivf_pq
        with enough rows trained now (in this thread: the ranker is not
        serving yet)."""
        with self._write_mutex:
            self._flush_loading()
            due = self._upkeep_due()
        if due:
            self._rebuild(Job(), pause=0.0)

    def upsert(self, names: Sequence[str], vectors32: np.ndarray, updated_at: float | None = None) -> tuple[int, int]:
        vectors32 = self._check_rows(names, vectors32)
        last = last_of(names)
        unique = list(last)
        block = vectors32[list(last.values())]
        with self._write_mutex:
            with self._rw.write():
                replaced = sum(1 for name in unique if name in self._ids)
                first = self._give_ids(unique)
                self._add(first, block)
                if updated_at is not None:
                    self.updated_at = updated_at
            self._maintain()
        return len(unique) - replaced, len(names) - (len(unique) - replaced)

    def delete(self, names: Iterable[str], updated_at: float | None = None) -> list[str]:
        removed = []
        with self._write_mutex:
            with self._rw.write():
                for name in names:
                    fid = self._ids.pop(name, None)
                    if fid is None:
                        continue
                    self._kill(fid)
                    self._names_bytes -= sys.getsizeof(name)
                    removed.append(name)
                if updated_at is not None and removed:
                    self.updated_at = updated_at
            self._maintain()
        return removed

    def rename(self, renamings: Sequence[tuple[str, str]], updated_at: float | None = None) -> None:
        # Each vector goes under a fresh id and its old id dies, as an upsert and
        # a delete would (so a background rebuild catches up with it), under one
        # write lock.
        with self._write_mutex:
            with self._rw.write():
                for old, new in renamings:
                    fid = self._ids.get(old)
                    if old == new or fid is None:
                        continue
                    block = self._rows([fid]).copy()
                    self._add(self._give_ids([new]), block)  # a target present dies
                    del self._ids[old]
                    self._kill(fid)
                    self._names_bytes -= sys.getsizeof(old)
                if updated_at is not None:
                    self.updated_at = updated_at
            self._maintain()

    # ------------------------------------------------------------ background rebuilds (faiss_build.py)

    def _upkeep_due(self) -> bool:
        """Is a rebuild due (caller holds the write mutex)? Dead ids past the
        threshold, or an untrained ivf_pq with enough live rows to train."""
        if compaction_due(self._dead, len(self._names_by_id)):
            return True
        return (self.spec.kind == IVF_PQ and not self._index.is_trained
                and len(self._ids) >= train_size(self.spec.nlist))

    def _maintain(self) -> None:
        """Start a background rebuild if one is due and none runs (caller holds the write mutex)."""
        self._upkeep.maintain()

    def start_upkeep(self) -> None:
        """Start a rebuild now if one is due (after a restore from index files)."""
        with self._write_mutex:
            self._maintain()

    def stop_background(self, timeout: float = background.STOP_WAIT_S) -> None:
        """No more background rebuilds: the one running is cancelled (it never
        swaps after this returns) and waited for (it stops between chunks)."""
        self._upkeep.stop(timeout)

    def wait_background(self, timeout: float | None = None) -> bool:
        """Wait until no rebuild runs or is due to follow (tests, benchmarks); False on timeout."""
        return self._upkeep.wait(timeout)

    @property
    def rebuilding(self) -> bool:
        return self._upkeep.running

    def close(self) -> None:
        self.stop_background()
        with self._rw.write():  # searches in flight finish first
            if self._disk is not None:
                self._disk.close()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
