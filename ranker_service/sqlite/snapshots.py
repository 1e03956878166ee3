"""Snapshots next to the database, for a fast start-up
(docs/ranker.md#index-files-and-start-up): per collection (files named by a
hash of its name, in `<db>.index/`) its index files and the k-reciprocal
neighbourhoods searches asked for; `Snapshots` keeps track of what is on disk.

- `<stem>.meta.json` (name, kind, build parameters, dimension, fingerprint,
  count and the database generation the files reflect), `<stem>.names` (the
  names by FAISS id or row, NUL-separated; "" for a dead id) and `<stem>.npy`
  (exact float32) or `<stem>.faiss` (ivf_pq also has `<stem>.rows.f32`).
- `<stem>.kr-K1-K2.json`, `.names`, `.npz`: the arrays of
  rerank.maths.Neighbourhoods, over the collection's own vectors.

A collection is loaded from its files only when their meta matches the
database (its generation: a counter every write bumps); otherwise it is
rebuilt from SQLite. The meta is removed first and written last (tmp file +
fsync + os.replace), so a crash mid-save leaves no meta, or a stale one,
never a meta over files it does not describe.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import faiss
import numpy as np

from imagesearch.files import atomic_write, atomic_write_text
from ranker_service.memory.collection import Collection
from ranker_service.memory.exact import ExactCollection
from ranker_service.memory.faiss import FaissCollection
from ranker_service.memory.faiss import file_stem as stem
from ranker_service.memory.faiss_build import DiskRows
from ranker_service.memory.registry import Registry
from ranker_service.rerank.cache import DerivedData
from ranker_service.rerank.maths import Neighbourhoods
from ranker_service.sqlite.store import StoredCollection
from ranker_service.types import EXACT, IVF_PQ, IndexSpec

log = logging.getLogger(__name__)

FORMAT = 1


def folder_for(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".index")


def _replace(tmp: Path, path: Path) -> None:
    """For files a library writes by path (faiss.write_index); the others go through atomic_write."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_names(path: Path, names: list[str | None]) -> None:
    data = b"\0".join((n or "").encode("utf-8") for n in names)
    atomic_write(path, lambda f: f.write(data))


def _write_meta(path: Path, meta: dict) -> None:
    atomic_write_text(path, json.dumps(meta))


def read_names(path: Path) -> list[str | None]:
    data = path.read_bytes()
    if not data:
        return []
    return [n.decode("utf-8") or None for n in data.split(b"\0")]


def _meta(coll: Collection, spec: IndexSpec, generation: int) -> dict:
    return {"format": FORMAT, "name": coll.name, "kind": spec.kind, "params": spec.build_params(), "dim": coll.dim,
            "fingerprint": coll.fingerprint, "generation": generation, "count": len(coll)}


def save(coll: Collection, folder: Path, generation: int) -> None:
    """Write `coll`'s files for database generation `generation`. The caller
    keeps writers out (the backend's write lock)."""
    folder.mkdir(exist_ok=True)
    base = folder / stem(coll.name)
    meta_path = base.with_suffix(".meta.json")
    meta_path.unlink(missing_ok=True)
    if isinstance(coll, ExactCollection):
        matrix, names = coll.snapshot_view()
        atomic_write(base.with_suffix(".npy"), lambda f: np.save(f, matrix))
        write_names(base.with_suffix(".names"), names)
    else:
        index, names = coll.state()
        tmp = base.with_suffix(".faiss.tmp")
        faiss.write_index(index, str(tmp))
        _replace(tmp, base.with_suffix(".faiss"))
        write_names(base.with_suffix(".names"), names)
        coll.flush_rows()
    _write_meta(meta_path, _meta(coll, coll.spec, generation))


def load(name: str, dim: int, fingerprint: str, spec: IndexSpec, generation: int, count: int, folder: Path, *,
         created_at: float, updated_at: float, on_rows_replaced: Callable[[str], None] | None = None
         ) -> Collection | None:
    """The collection from its files, or None when they are missing or stale."""
    base = folder / stem(name)
    try:
        meta = json.loads(base.with_suffix(".meta.json").read_text())
    except (OSError, ValueError):
        return None
    want = {"format": FORMAT, "name": name, "kind": spec.kind, "params": spec.build_params(), "dim": dim,
            "fingerprint": fingerprint, "generation": generation, "count": count}
    if meta != want:
        log.info("collection %r: index files are stale (generation %s, database %s): rebuilding from SQLite",
                 name, meta.get("generation"), generation)
        return None
    try:
        names = read_names(base.with_suffix(".names"))
        if spec.kind == EXACT and not spec.float16:
            matrix = np.load(base.with_suffix(".npy"))
            if matrix.shape != (count, dim) or len(names) != count or None in names:
                return None
            return ExactCollection.restore(name, dim, fingerprint, matrix, names, created_at=created_at,
                                           updated_at=updated_at)
        index = faiss.read_index(str(base.with_suffix(".faiss")))
        rows = None
        if spec.kind == IVF_PQ:
            rows = DiskRows(base.with_suffix(".rows.f32"), dim, truncate=False)
            if rows.rows() < len(names):
                rows.close()
                return None
        return FaissCollection.restore(name, dim, fingerprint, spec, index, names, rows, folder,
                                       created_at=created_at, updated_at=updated_at,
                                       on_rows_replaced=on_rows_replaced)
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("collection %r: cannot read its index files (%s): rebuilding from SQLite", name, exc)
        return None


def _kr_path(name: str, folder: Path, k1: int, k2: int, suffix: str) -> Path:
    return folder / f"{stem(name)}.kr-{k1}-{k2}{suffix}"


def _kr_meta(coll: Collection, generation: int, k1: int, k2: int) -> dict:
    return {"format": FORMAT, "name": coll.name, "dim": coll.dim, "fingerprint": coll.fingerprint,
            "generation": generation, "count": len(coll), "k1": k1, "k2": k2}


def save_k_reciprocal(coll: Collection, neighbourhoods: Neighbourhoods, folder: Path, generation: int) -> None:
    """Write `coll`'s k-reciprocal neighbourhoods built
    from database generation `generation`; the meta last."""
    k1, k2 = neighbourhoods.k1, neighbourhoods.k2
    folder.mkdir(exist_ok=True)
    meta_path = _kr_path(coll.name, folder, k1, k2, ".json")
    meta_path.unlink(missing_ok=True)
    atomic_write(_kr_path(coll.name, folder, k1, k2, ".npz"), lambda f: np.savez(f, **neighbourhoods.arrays()))
    write_names(_kr_path(coll.name, folder, k1, k2, ".names"), neighbourhoods.names)
    _write_meta(meta_path, _kr_meta(coll, generation, k1, k2))


def load_k_reciprocal(coll: Collection, folder: Path, generation: int) -> dict[tuple[int, int], Neighbourhoods]:
    """{(k1, k2): Neighbourhoods} saved for database generation `generation`,
    over a copy of the collection's vectors. Files that are stale, damaged or
    over other rows are left out (the pair is built again when a search asks)."""
    found = {}
    rows = None
    for meta_path in sorted(folder.glob(f"{stem(coll.name)}.kr-*.json")):
        try:
            meta = json.loads(meta_path.read_text())
            k1, k2 = int(meta["k1"]), int(meta["k2"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if meta != _kr_meta(coll, generation, k1, k2):
            log.info("collection %r: saved k-reciprocal neighbourhoods k1=%d k2=%d are stale: left out", coll.name,
                     k1, k2)
            continue
        try:
            names = read_names(_kr_path(coll.name, folder, k1, k2, ".names"))
            with np.load(_kr_path(coll.name, folder, k1, k2, ".npz")) as arrays:
                arrays = {name: arrays[name] for name in Neighbourhoods.ARRAYS}
            if rows is None:
                matrix, stored_names = coll.snapshot()
                rows = {name: i for i, name in enumerate(stored_names)}
            if len(names) != len(rows) or set(names) != rows.keys():
                raise ValueError("they name other rows than the collection's")
            order = np.fromiter((rows[name] for name in names), dtype=np.int64, count=len(names))
            same = bool((order == np.arange(len(order))).all())
            found[(k1, k2)] = Neighbourhoods.from_arrays(matrix if same else matrix[order], names, arrays, k1, k2)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("collection %r: cannot use its saved k-reciprocal neighbourhoods k1=%d k2=%d (%s): left out",
                        coll.name, k1, k2, exc)
    return found


def remove_k_reciprocal(name: str, folder: Path, keep: Iterable[tuple[int, int]] = ()) -> None:
    """Remove the collection's saved k-reciprocal files but those of the (k1, k2) in `keep`."""
    for path in folder.glob(f"{stem(name)}.kr-*"):
        pair = path.name[len(stem(name)) + len(".kr-"):].split(".")[0]
        try:
            k1, k2 = (int(x) for x in pair.split("-"))
        except ValueError:
            k1 = k2 = None
        if (k1, k2) not in keep:
            path.unlink(missing_ok=True)


def invalidate(name: str, folder: Path) -> None:
    """Remove the collection's meta: its files are loaded no more (a rebuild
    replaced a file they need)."""
    (folder / stem(name)).with_suffix(".meta.json").unlink(missing_ok=True)


def remove(name: str, folder: Path) -> None:
    base = folder / stem(name)
    for suffix in (".meta.json", ".names", ".npy", ".faiss", ".rows.f32"):
        base.with_suffix(suffix).unlink(missing_ok=True)
    remove_k_reciprocal(name, folder)


class Snapshots:
    """What a clean stop writes, for the next start, and what is on disk now
    (the backend's write lock held, or no writes can come)."""

    def __init__(self, folder: Path):
        self.folder = folder
        # collection -> (database generation, rebuilds swapped in) its index files hold
        self._saved: dict[str, tuple[int, int]] = {}
        # collection -> {(k1, k2): database generation its file holds}
        self._derived: dict[str, dict] = {}

    def load(self, meta: StoredCollection, spec: IndexSpec, on_rows_replaced: Callable[[str], None] | None
             ) -> Collection | None:
        coll = load(meta.name, meta.dim, meta.fingerprint, spec, meta.generation, meta.count, self.folder,
                    created_at=meta.created_at, updated_at=meta.updated_at, on_rows_replaced=on_rows_replaced)
        if coll is not None:
            self._saved[meta.name] = (meta.generation, coll.swaps)
        return coll

    def load_derived(self, coll: Collection, generation: int) -> dict:
        """{(k1, k2): neighbourhoods} the last clean stop saved for this generation."""
        built = load_k_reciprocal(coll, self.folder, generation)
        for k1, k2 in built:
            log.info("collection %r: k-reciprocal neighbourhoods k1=%d k2=%d loaded from their files",
                     coll.name, k1, k2)
        self._derived[coll.name] = {key: generation for key in built}
        return built

    def save(self, coll: Collection, generation: int) -> None:
        t0 = time.perf_counter()
        try:
            save(coll, self.folder, generation)
        except OSError as exc:  # the next start rebuilds from SQLite: slower, still correct
            log.warning("collection %r: cannot write its index files to %s: %s", coll.name, self.folder, exc)
            return
        self._saved[coll.name] = (generation, coll.swaps)
        log.info("collection %r: index files written (generation %d) in %.2fs", coll.name, generation,
                 time.perf_counter() - t0)

    def save_changed(self, stored: Iterable[StoredCollection], index: Registry, derived: DerivedData) -> None:
        """Write the files of every collection changed since they were last written."""
        for meta in stored:
            coll = index.find(meta.name)
            if coll is None:
                continue
            if self._saved.get(meta.name) != (meta.generation, coll.swaps):
                self.save(coll, meta.generation)
            self._save_derived(coll, meta.generation, derived)

    def _save_derived(self, coll: Collection, generation: int, derived: DerivedData) -> None:
        """Write the derived data of `coll` that is current at `generation` and
        not on disk yet; remove saved k-reciprocal files of pairs no longer held."""
        current = {key: value for key, (built, value) in derived.current(coll.name).items() if built == generation}
        saved = self._derived.setdefault(coll.name, {})
        for key, value in current.items():
            if saved.get(key) == generation:
                continue
            try:
                save_k_reciprocal(coll, value, self.folder, generation)
            except OSError as exc:  # the next start rebuilds it: slower, still correct
                log.warning("collection %r: cannot write its derived re-ranking data to %s: %s", coll.name,
                            self.folder, exc)
            else:
                saved[key] = generation
        remove_k_reciprocal(coll.name, self.folder, keep=current)
        for key in [k for k in saved if k not in current]:
            del saved[key]

    def forget(self, collection: str) -> None:
        """A dropped collection: its files go."""
        self._saved.pop(collection, None)
        self._derived.pop(collection, None)
        remove(collection, self.folder)
