"""Building and rebuilding a FAISS collection's index (faiss.py): the empty
index of a kind, ivf_pq's float32 rows file, and the background rebuild that
drops dead ids or trains an ivf_pq while searches and writes go on, then
swaps under the write lock (docs/ranker.md#index-kinds: how no search ever
sees a dead id, and what a clean stop or a crash mid-rebuild leaves).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from ranker_service.memory.background import Job
from ranker_service.types import EXACT, HNSW, IVF_PQ, IndexSpec

log = logging.getLogger(__name__)

ADD_CHUNK = 16384          # vectors per FAISS add() while loading or rebuilding
TRAIN_POINTS_PER_LIST = 40  # ivf_pq training sample: this many vectors per list ...
MIN_TRAIN = 1024            # ... and at least this many (PQ codebooks have 256 entries)
BUILD_THREADS = int(os.environ.get("IMAGESEARCH_RANKER_BUILD_THREADS") or os.cpu_count() or 1)
REBUILD_CHUNK = 1024      # vectors per FAISS add() in a rebuild: how soon a cancelled one stops
CATCH_UP_PASSES = 8       # a rebuild catches up with writes made meanwhile in at most this many passes ...
CATCH_UP_FINAL = 1024     # ... until fewer new ids than this are left: those it adds under the write mutex
# A collection is compacted (dead FAISS ids dropped) once dead ids make up more
# than this share of its index ...
REBUILD_DEAD_SHARE = 0.25
# ... and at least this many (so small collections are not rebuilt on every delete).
REBUILD_MIN_DEAD = 1024


def compaction_due(dead: int, total: int) -> bool:
    return dead >= REBUILD_MIN_DEAD and dead > REBUILD_DEAD_SHARE * total


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

    def copy(self, coll: Rebuilds, job: Job, ids: np.ndarray, pause: float) -> bool:
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


class Rebuilds:
    """The background rebuild of a FaissCollection (faiss.py), which inherits
    it: the state it reads and swaps is the collection's."""

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
            compact = self.spec.kind != IVF_PQ or self._index.is_trained or compaction_due(self._dead, total)
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
                            if self.on_rows_replaced is not None:
                                self.on_rows_replaced(self.name)
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
