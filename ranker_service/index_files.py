"""Index files next to the database, for a fast start-up.

`<db>.index/` holds, per collection (files named by a hash of its name):
`<stem>.meta.json` (name, kind, parameters, dimension, count and the
database generation the files reflect), `<stem>.names` (the names by FAISS id
or row, NUL-separated; "" for a dead id) and the vectors: `<stem>.npy`
(exact float32 matrix) or `<stem>.faiss` (faiss.write_index; ivf_pq also keeps
its float32 rows in `<stem>.rows.f32`, the re-rank source). The k-reciprocal
neighbourhoods of each (k1, k2) searches asked for, derived data that takes
O(G^2) work to rebuild, are kept too (`<stem>.kr-K1-K2.json`, `.names`,
`.npz`: the arrays of reranking.Neighbourhoods over the collection's own
vectors): written at a clean stop and read at start-up when they match, else
rebuilt when a search asks.

The database keeps one generation counter, bumped by every write, and each
collection records the generation of its last write. At start-up a
collection is loaded from its files only when their meta names the same
generation, kind, build parameters (not ef_search, nprobe or the re-rank,
which only steer searches and may change between starts), dimension and
count; otherwise it is rebuilt
from SQLite (and its files are written again). Files are written at a clean
stop and after a rebuild at start-up; the meta is removed first and written
last (tmp file + fsync + os.replace), so a crash mid-save leaves no meta, or
a stale one, never a meta over files it does not describe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import faiss
import numpy as np

from imagesearch.files import atomic_write, atomic_write_text
from ranker_service.faiss_collection import DiskRows, FaissCollection
from ranker_service.kinds import IVF_PQ, IndexSpec

log = logging.getLogger(__name__)

FORMAT = 1


def stem(collection: str) -> str:
    return hashlib.sha256(collection.encode("utf-8")).hexdigest()[:32]


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


def _write_matrix(coll, matrix_path: Path, names_path: Path) -> None:
    """An exact Collection's float32 rows (.npy) and names."""
    matrix, names = coll.snapshot_view()
    atomic_write(matrix_path, lambda f: np.save(f, matrix))
    write_names(names_path, names)


def _meta(coll, spec: IndexSpec, generation: int) -> dict:
    return {"format": FORMAT, "name": coll.name, "kind": spec.kind, "params": spec.build_params(), "dim": coll.dim,
            "fingerprint": coll.fingerprint, "generation": generation, "count": len(coll)}


def save(coll, folder: Path, generation: int) -> None:
    """Write `coll`'s files for database generation `generation`. The caller
    keeps writers out (the gallery's write lock)."""
    from ranker_service.index import Collection

    folder.mkdir(exist_ok=True)
    base = folder / stem(coll.name)
    meta_path = base.with_suffix(".meta.json")
    meta_path.unlink(missing_ok=True)
    if isinstance(coll, Collection):
        _write_matrix(coll, base.with_suffix(".npy"), base.with_suffix(".names"))
        spec = coll.spec
    else:
        spec = coll.spec
        index, names = coll.state()
        tmp = base.with_suffix(".faiss.tmp")
        faiss.write_index(index, str(tmp))
        _replace(tmp, base.with_suffix(".faiss"))
        write_names(base.with_suffix(".names"), names)
        coll.flush_rows()
    _write_meta(meta_path, _meta(coll, spec, generation))


def load(name: str, dim: int, fingerprint: str, spec: IndexSpec, generation: int, count: int, folder: Path, *,
         created_at: float, updated_at: float):
    """The collection from its files, or None when they are missing or stale."""
    from ranker_service.index import Collection

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
        if spec.kind == "exact" and not spec.float16:
            matrix = np.load(base.with_suffix(".npy"))
            if matrix.shape != (count, dim) or len(names) != count or None in names:
                return None
            return Collection.restore(name, dim, fingerprint, matrix, names, created_at=created_at,
                                      updated_at=updated_at, spec=spec)
        index = faiss.read_index(str(base.with_suffix(".faiss")))
        rows = None
        if spec.kind == IVF_PQ:
            rows = DiskRows(base.with_suffix(".rows.f32"), dim, truncate=False)
            if rows.rows() < len(names):
                rows.close()
                return None
        return FaissCollection.restore(name, dim, fingerprint, spec, index, names, rows, folder,
                                       created_at=created_at, updated_at=updated_at)
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("collection %r: cannot read its index files (%s): rebuilding from SQLite", name, exc)
        return None


def _kr_path(name: str, folder: Path, k1: int, k2: int, suffix: str) -> Path:
    return folder / f"{stem(name)}.kr-{k1}-{k2}{suffix}"


def _kr_meta(coll, generation: int, k1: int, k2: int) -> dict:
    return {"format": FORMAT, "name": coll.name, "dim": coll.dim, "fingerprint": coll.fingerprint,
            "generation": generation, "count": len(coll), "k1": k1, "k2": k2}


def save_k_reciprocal(coll, neighbourhoods, folder: Path, generation: int) -> None:
    """Write `coll`'s k-reciprocal neighbourhoods (reranking.Neighbourhoods) built
    from database generation `generation`; the meta last."""
    k1, k2 = neighbourhoods.k1, neighbourhoods.k2
    folder.mkdir(exist_ok=True)
    meta_path = _kr_path(coll.name, folder, k1, k2, ".json")
    meta_path.unlink(missing_ok=True)
    atomic_write(_kr_path(coll.name, folder, k1, k2, ".npz"), lambda f: np.savez(f, **neighbourhoods.arrays()))
    write_names(_kr_path(coll.name, folder, k1, k2, ".names"), neighbourhoods.names)
    _write_meta(meta_path, _kr_meta(coll, generation, k1, k2))


def load_k_reciprocal(coll, folder: Path, generation: int) -> dict:
    """{(k1, k2): Neighbourhoods} saved for database generation `generation`,
    over a copy of the collection's vectors. Files that are stale, damaged or
    over other rows are left out (the pair is built again when a search asks)."""
    from ranker_service.reranking import Neighbourhoods

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


def remove_k_reciprocal(name: str, folder: Path, keep: set = frozenset()) -> None:
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
