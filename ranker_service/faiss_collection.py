"""One collection held in a FAISS index: `exact` float16, `hnsw` or `ivf_pq`.

Ids: every stored version of a vector gets a fresh FAISS id (0, 1, 2, ...),
never reused. A replacement or a delete marks the old id dead in a bitmap of
live ids; searches pass that bitmap to FAISS as an `IDSelectorBitmap`, so a
dead id is never returned (HNSW cannot remove ids, and re-adding an id leaves
the old vector findable). Once dead ids pass `REBUILD_DEAD_SHARE` of the index
(and `REBUILD_MIN_DEAD`), the collection is rebuilt from its live vectors with
ids 0..n-1, in the background (see below).

Background rebuilds: the write that passes the threshold only starts a
thread and returns. The thread builds a new index from a snapshot of the live
ids, reading rows under the read lock a chunk at a time, while searches use
the current index with its tombstones and writes go on applying to it (new
ids, new tombstones). It then catches up with the ids written meanwhile, in
passes without the write mutex until few are left, and finally, under the
write mutex (writers wait for at most `CATCH_UP_FINAL` adds), adds the last
ones, marks dead every copied id that died meanwhile, and swaps the index,
names, id map, live bitmap (and ivf_pq's rows file) under the write lock. No
search ever sees a dead id: before the swap the old bitmap excludes it, after
it the new one. An ivf_pq with enough rows is trained the same way (the ids
kept, only the index swapped). A rebuild is cancelled, never swapped, once
the collection is closing (`stop_background`); SQLite stays the truth, and a
crash mid-rebuild leaves index files older than the database's generation,
so the next start rebuilds from SQLite.

Re-rank: the candidates FAISS returns are rescored in float64 from the stored
float32 vectors (HNSW: its own flat storage; ivf_pq: a float32 file on disk,
read with pread, so the full vectors take page cache, not process memory;
exact float16: the float16 rows themselves) and sorted by (-score, name).

`ivf_pq` needs training: below `train_size(nlist)` vectors (and until its
background training is swapped in) it answers by an exact scan of its
on-disk rows.

Locking as in `index.Collection`: one writer at a time (`_write_mutex`), the
readers-writer lock around every change searches could see.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import faiss
import numpy as np

from ranker_service import background, kinds
from ranker_service.background import Job
from ranker_service.kinds import EXACT, HNSW, IVF_PQ, IndexSpec
from ranker_service.ranking import score_margin, select_top_k
from ranker_service.rwlock import ReadWriteLock

log = logging.getLogger(__name__)

ADD_CHUNK = 16384          # vectors per FAISS add() while loading or rebuilding
TRAIN_POINTS_PER_LIST = 40  # ivf_pq training sample: this many vectors per list ...
MIN_TRAIN = 1024            # ... and at least this many (PQ codebooks have 256 entries)
REBUILD_MIN_DEAD = kinds.REBUILD_MIN_DEAD
BUILD_THREADS = int(os.environ.get("IMAGESEARCH_RANKER_BUILD_THREADS") or os.cpu_count() or 1)
REBUILD_CHUNK = 1024      # vectors per FAISS add() in a rebuild: how soon a cancelled one stops
CATCH_UP_PASSES = 8       # a rebuild catches up with writes made meanwhile in at most this many passes ...
CATCH_UP_FINAL = 1024     # ... until fewer new ids than this are left: those it adds under the write mutex
# Seconds a background rebuild sleeps after each chunk (background.PAUSE_S,
# IMAGESEARCH_RANKER_REBUILD_PAUSE_S): a throttle; tests hold a rebuild open with it.
REBUILD_PAUSE_S = background.PAUSE_S


def train_size(nlist: int) -> int:
    return max(TRAIN_POINTS_PER_LIST * nlist, MIN_TRAIN)


class DiskRows:
    """float32 rows by id in a file (the re-rank source of ivf_pq): appended as
    ids are given out, read back with pread. Not fsync'ed: SQLite is the truth,
    and a stale or torn file is rebuilt from it."""

    def __init__(self, path: Path, dim: int, *, truncate: bool = True):
        self.path = path
        self.dim = dim
        self.row_bytes = dim * 4
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_TRUNC if truncate else 0), 0o644)

    def rows(self) -> int:
        return os.fstat(self._fd).st_size // self.row_bytes

    def write(self, first_id: int, block: np.ndarray) -> None:
        data = np.ascontiguousarray(block, dtype="<f4").tobytes()
        offset = first_id * self.row_bytes
        while data:
            done = os.pwrite(self._fd, data, offset)
            data, offset = data[done:], offset + done

    def read(self, ids: Sequence[int]) -> np.ndarray:
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for j, i in enumerate(ids):
            out[j] = np.frombuffer(os.pread(self._fd, self.row_bytes, int(i) * self.row_bytes), dtype="<f4")
        return out

    def read_range(self, start: int, stop: int) -> np.ndarray:
        data = os.pread(self._fd, (stop - start) * self.row_bytes, start * self.row_bytes)
        return np.frombuffer(data, dtype="<f4").reshape(-1, self.dim)

    def flush(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def new_index(spec: IndexSpec, dim: int):
    """An empty FAISS index of the spec's kind (ivf_pq untrained)."""
    if spec.kind == EXACT:
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    if spec.kind == HNSW:
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        return index
    if spec.kind == IVF_PQ:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, spec.nlist, spec.pq_bytes, 8, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()
        return index
    raise ValueError(f"no FAISS index for kind {spec.kind!r}")


class _Build:
    """The new index a rebuild fills, copying rows from the collection by id:
    when compacting, new id = position (with the names and the name -> id map
    built alongside), else the same id (ivf_pq training)."""

    def __init__(self, index, disk: DiskRows | None, compact: bool, chunk: int):
        self.index, self.disk, self.compact, self.chunk = index, disk, compact, chunk
        self.count = 0
        self.seconds = 0.0
        self._old_ids: list[np.ndarray] = []
        self._names: list[str | None] = []
        self._ids: dict[str, int] = {}

    def copy(self, coll: FaissCollection, job: Job, ids: np.ndarray, pause: float) -> bool:
        """Rows of `ids` (ascending) into the new index; False if cancelled."""
        for start in range(0, ids.shape[0], self.chunk):
            if job.cancelled:
                return False
            chunk = ids[start:start + self.chunk].astype(np.int64)
            with coll._rw.read():
                block = coll._rows(chunk)
                names = [coll._names_by_id[i] for i in chunk] if self.compact else None
            t0 = time.perf_counter()
            first = self.count
            if self.disk is not None:
                self.disk.write(first, block)
            if coll.spec.kind == IVF_PQ:
                if self.index.is_trained:
                    target = np.arange(first, first + chunk.shape[0], dtype=np.int64) if self.compact else chunk
                    self.index.add_with_ids(block, target)
            else:
                self.index.add(block)  # ids 0, 1, ...: positions (these kinds always compact)
            self.seconds += time.perf_counter() - t0
            if self.compact:
                self._old_ids.append(chunk)
                for j, name in enumerate(names):
                    if name is not None:
                        self._ids[name] = first + j  # a later id of a name wins: the earlier one is dead
                self._names.extend(names)
            self.count += chunk.shape[0]
            if pause:
                time.sleep(pause)
        return True

    def finish(self, bits: np.ndarray) -> tuple[list[str | None], dict[str, int], np.ndarray, int]:
        """Names by new id, name -> id, the live bitmap and the dead count,
        with every copied id that is dead now (`bits`: the collection's live
        ids, read under the write mutex) marked dead."""
        old = np.concatenate(self._old_ids) if self._old_ids else np.empty(0, dtype=np.int64)
        dead = np.flatnonzero(bits[old] == 0)
        for pos in dead.tolist():
            name = self._names[pos]
            if name is not None and self._ids.get(name) == pos:
                del self._ids[name]
            self._names[pos] = None
        alive = np.ones(self.count, dtype=bool)
        alive[dead] = False
        live = np.zeros(max(8, (self.count + 7) // 8), dtype=np.uint8)
        packed = np.packbits(alive, bitorder="little")
        live[: packed.shape[0]] = packed
        return self._names, self._ids, live, int(dead.shape[0])


class FaissCollection:
    """Same interface as `index.Collection`, over a FAISS index."""

    def __init__(self, name: str, dim: int, fingerprint: str, spec: IndexSpec, *, created_at: float | None = None,
                 updated_at: float | None = None, capacity: int = 0, files_dir: Path | None = None,
                 rows: DiskRows | None = None):
        if dim <= 0:
            raise ValueError(f"dimension must be positive, got {dim}")
        now = time.time()
        self.name = name
        self.dim = int(dim)
        self.fingerprint = fingerprint
        self.spec = spec
        self.created_at = now if created_at is None else created_at
        self.updated_at = self.created_at if updated_at is None else updated_at
        self.margin = score_margin(self.dim)
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
        self.swaps = 0  # rebuilds swapped in (the gallery rewrites index files after one)

    def rows_path(self, files_dir: Path) -> Path:
        from ranker_service.index_files import stem

        return files_dir / f"{stem(self.name)}.rows.f32"

    @classmethod
    def restore(cls, name: str, dim: int, fingerprint: str, spec: IndexSpec, index, names_by_id: list[str | None],
                rows: DiskRows | None, files_dir: Path, *, created_at: float, updated_at: float) -> FaissCollection:
        """A collection from its saved index and names (see index_files)."""
        if index.d != dim or index.ntotal != (len(names_by_id) if spec.kind != IVF_PQ or index.is_trained
                                              else 0):
            if rows is not None:
                rows.close()
            raise ValueError(f"saved index holds {index.ntotal} vectors of dim {index.d}, "
                             f"names {len(names_by_id)}, expected dim {dim}")
        coll = cls(name, dim, fingerprint, spec, created_at=created_at, updated_at=updated_at,
                   capacity=len(names_by_id), files_dir=files_dir, rows=rows)
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

    def stats(self):
        from ranker_service.index import CollectionStats

        return CollectionStats(self.name, len(self), self.dim, self.fingerprint, self.memory_bytes(),
                               self.created_at, self.updated_at, self.spec)

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

    def search(self, queries64: np.ndarray, top_ks: Sequence[int]) -> list[list[tuple[str, float]]]:
        queries64 = np.atleast_2d(queries64)
        if queries64.shape[1] != self.dim or queries64.shape[0] != len(top_ks):
            raise ValueError(f"queries of shape {queries64.shape} for dim {self.dim} and {len(top_ks)} top_k values")
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

    def _rank(self, ids: np.ndarray, query64: np.ndarray, k: int) -> list[tuple[str, float]]:
        ids = [int(i) for i in ids if i >= 0]
        if not ids:
            return []
        names = [self._names_by_id[i] for i in ids]
        if not self.spec.rerank and self.spec.kind != EXACT:
            # FAISS's own order and (approximate) scores are not kept: score the
            # candidates exactly anyway, but only the first k of them.
            ids, names = ids[:k], names[:k]
        scores = (self._rows(ids).astype(np.float64) * query64).sum(axis=1)
        order = sorted(range(len(ids)), key=lambda j: (-scores[j], names[j]))[:k]
        return [(names[j], float(scores[j])) for j in order]

    def search_among(self, query64: np.ndarray, k: int, names: Iterable[str]) -> list[tuple[str, float]]:
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

    def search_filtered(self, query64: np.ndarray, k: int, names: Iterable[str]) -> list[tuple[str, float]] | None:
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
        vectors32 = np.ascontiguousarray(vectors32, dtype=np.float32)
        if vectors32.ndim != 2 or vectors32.shape != (len(names), self.dim):
            raise ValueError(f"{len(names)} names with vectors of shape {vectors32.shape} for dim {self.dim}")
        last: dict[str, int] = {}
        for j, name in enumerate(names):
            last[name] = j
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

    # ------------------------------------------------------------ background rebuilds

    def _upkeep_due(self) -> bool:
        """Is a rebuild due (caller holds the write mutex)? Dead ids past the
        threshold, or an untrained ivf_pq with enough live rows to train."""
        if self._dead >= REBUILD_MIN_DEAD and self._dead > kinds.REBUILD_DEAD_SHARE * len(self._names_by_id):
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

    def _rebuild(self, job: Job, pause: float) -> bool:
        """Build a new index from a snapshot of the live ids, outside the write
        mutex, while searches use the current index and writes go on applying
        to it; catch up with those writes in passes; then, under the write
        mutex, add the last few, mark what died meanwhile, and swap under the
        write lock. Compaction (dead ids past the threshold) gives the live
        vectors new ids 0..n-1 (and ivf_pq a new rows file); training an
        ivf_pq keeps the ids and swaps only the index. Returns True once
        swapped, False when cancelled."""
        t0 = time.perf_counter()
        with self._write_mutex:  # the snapshot: writers wait only for this
            if job.cancelled:
                return False
            total = len(self._names_by_id)
            # ivf_pq may rebuild only to train (ids kept); the other kinds rebuild only to compact
            compact = (self.spec.kind != IVF_PQ or self._index.is_trained
                       or (self._dead >= REBUILD_MIN_DEAD and self._dead > kinds.REBUILD_DEAD_SHARE * total))
            live_ids = np.flatnonzero(np.unpackbits(self._live, bitorder="little")[:total])
            index = None
            if self.spec.kind == IVF_PQ and self._index.is_trained:
                index = faiss.clone_index(self._index)  # keeps the trained lists and codebooks
                index.reset()
        faiss.omp_set_num_threads(BUILD_THREADS)
        trained_now = False
        if index is None:
            index = new_index(self.spec, self.dim)
            if self.spec.kind == IVF_PQ and live_ids.shape[0] >= train_size(self.spec.nlist):
                rng = np.random.default_rng(0)
                sample = np.sort(rng.choice(live_ids, train_size(self.spec.nlist), replace=False))
                with self._rw.read():
                    rows = self._rows(sample)
                index.train(rows)
                del rows
                trained_now = True
        disk = None
        if compact and self._disk is not None:
            disk = DiskRows(self._disk.path.with_suffix(".rebuild"), self.dim)
        background = job.background
        build = _Build(index, disk, compact, REBUILD_CHUNK if background else ADD_CHUNK)
        swapped = False
        try:
            if not build.copy(self, job, live_ids, pause):
                return False
            seen = total
            for _ in range(CATCH_UP_PASSES):  # the writes made meanwhile, without the mutex
                with self._rw.read():
                    now = len(self._names_by_id)
                    bits = np.unpackbits(self._live, bitorder="little")
                if now - seen < CATCH_UP_FINAL:
                    break
                if not build.copy(self, job, seen + np.flatnonzero(bits[seen:now]), pause):
                    return False
                seen = now
            with self._write_mutex:
                if job.cancelled:
                    return False
                now = len(self._names_by_id)
                bits = np.unpackbits(self._live, bitorder="little")
                build.copy(self, job, seen + np.flatnonzero(bits[seen:now]), 0.0)
                if compact:
                    names, ids, live, dead = build.finish(bits)
                with self._rw.write():
                    self._index = index
                    if compact:
                        self._names_by_id, self._ids, self._live, self._dead = names, ids, live, dead
                        if disk is not None:  # index files saved earlier name the old rows: no longer valid
                            from ranker_service.index_files import invalidate

                            invalidate(self.name, self._disk.path.parent)
                            os.replace(disk.path, self._disk.path)
                            self._disk.close()
                            disk.path = self._disk.path
                            self._disk = disk
                swapped = True
                self.swaps += 1
                self.build_seconds += build.seconds
            what = "compacted" if compact else ("trained" if trained_now else "rebuilt")
            where = "in the background" if background else "at start-up"
            log.info("collection %r: %s %s index %s: %d vectors (%d written meanwhile) in %.1fs", self.name, what,
                     self.spec.label, where, build.count, max(0, now - total), time.perf_counter() - t0)
            return True
        finally:
            if disk is not None and not swapped:
                disk.close()
                disk.path.unlink(missing_ok=True)

    def close(self) -> None:
        self.stop_background()
        with self._rw.write():  # searches in flight finish first
            if self._disk is not None:
                self._disk.close()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
