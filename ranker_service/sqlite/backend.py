"""The default backend (`SqliteBackend`): the SQLite store and the
in-memory indexes kept in step.

Order of a write: validate, commit to SQLite, then apply to memory, all under
one write lock. So memory never holds what the database does not, and memory
applies writes in the order the database committed them. Searches touch only
memory (no lock shared with writers but the collection's readers-writer lock).

Upsert streams are committed in batches (`batch_size` items per transaction:
one fsync each). An item that fails validation first commits the valid items
before it, then fails the call with a message naming the item (index and
name), what was wrong, and how many items of the call were committed. A
failed commit rolls its batch back and says which items it held.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from imagesearch import errors
from imagesearch.errors import StoreError
from ranker_service import validation
from ranker_service.backend import DEFAULT_BATCH_SIZE, BackendBase, UpsertJob, not_renamed, with_progress
from ranker_service.memory.attributes import AttributeTables
from ranker_service.memory.collection import Collection
from ranker_service.memory.registry import Registry, matches
from ranker_service.rerank.cache import DerivedData, Wait
from ranker_service.rerank.search import needs, reranked_search
from ranker_service.sqlite import snapshots
from ranker_service.sqlite.aliases import SqliteAliases
from ranker_service.sqlite.backup import backup_copy
from ranker_service.sqlite.store import STORED_DTYPE, Store, UpsertRow
from ranker_service.types import (
    AttributeFilter,
    CollectionStats,
    DeleteResult,
    IndexSpec,
    ItemPage,
    LoadReport,
    Match,
    Pending,
    Query,
    RenameResult,
    UpsertItem,
)

log = logging.getLogger(__name__)



class SqliteBackend(BackendBase):
    """Store + indexes. Thread-safe. `load()` before use; `close()` at the end."""

    LOADING = "the ranker is still loading its database: retry shortly"

    def __init__(self, store: Store, index: Registry | None = None, *,
                 batch_size: int = DEFAULT_BATCH_SIZE, files_dir: Path | None = None):
        super().__init__(batch_size)
        self.store = store
        self.files_dir = files_dir or snapshots.folder_for(Path(store.path))
        self.files_dir.mkdir(exist_ok=True)
        self.snapshots = snapshots.Snapshots(self.files_dir)
        self.index = index or Registry(self.files_dir, self._rows_replaced)
        self.attributes = AttributeTables()
        self.derived = DerivedData()
        # collection -> database generation of its last write that memory holds (rerank/cache.py)
        self._generations: dict[str, int] = {}
        self._write_lock = threading.Lock()
        self.aliases = SqliteAliases(self)

    # ------------------------------------------------------------ life cycle

    def load(self) -> LoadReport:
        """Every collection into memory: from its index files when they hold
        the collection's current generation (sqlite/snapshots.py), else from
        SQLite: per collection one index preallocated to its row count, each
        BLOB copied once, straight into it (then built: FAISS kinds), and its
        index files written again. Raises StoreError for a damaged database."""
        start = time.perf_counter()
        path = self.store.path
        collections = {}
        count = 0
        for meta in self.store.collections():
            self._generations[meta.name] = meta.generation
            try:
                spec = validation.spec_from_json(meta.kind, meta.params)
            except (errors.InvalidArgument, ValueError) as exc:
                raise StoreError(f"{path}: collection {meta.name!r} has unusable index options "
                                 f"({meta.kind} {meta.params}): {exc}") from exc
            t0 = time.perf_counter()
            coll = self.snapshots.load(meta, spec, self._rows_replaced)
            if coll is not None:
                self.index.add(coll)
                count += len(coll)
                coll.start_upkeep()  # a rebuild due (dead ids past the threshold) runs in the background
                log.info("collection %r (%s, %d vectors): loaded from its index files in %.2fs",
                         meta.name, spec.label, len(coll), time.perf_counter() - t0)
                continue
            collections[meta.name] = (self.index.create(
                meta.name, meta.dim, meta.fingerprint, spec, created_at=meta.created_at, updated_at=meta.updated_at,
                capacity=meta.count), meta.generation)
        if collections:
            count += self._load_rows({name: coll for name, (coll, _) in collections.items()})
        for name, (coll, generation) in collections.items():
            t0 = time.perf_counter()
            coll.finish_load()
            bad = coll.first_nonfinite()
            if bad is not None:
                raise StoreError(f"{path}: vector {bad!r} of collection {coll.name!r} holds NaN or Inf: "
                                 "the database is damaged")
            log.info("collection %r (%s, %d vectors): built from SQLite in %.2fs (index build time; %.2fs after "
                     "reading rows)", name, coll.spec.label, len(coll), coll.build_seconds, time.perf_counter() - t0)
            if coll.spec.label != "exact":  # building was costly: keep it for the next start
                self.snapshots.save(coll, generation)
        for collection, name, text in self.store.iter_attributes():
            self.attributes.table(collection).set([(name, validation.from_json(text))])
        for coll in self.index.collections():  # derived data the last clean stop saved for this generation
            generation = self._generations[coll.name]
            self.derived.track(coll, generation, built=self.snapshots.load_derived(coll, generation))
        self.aliases.load()
        self._ready = True
        report = LoadReport(len(self.index.collection_names()), count, time.perf_counter() - start,
                            self.memory_bytes())
        log.info("loaded %d vectors in %d collections from %s in %.2fs (%.1f MB in memory)",
                 report.vectors, report.collections, path, report.seconds, report.memory_bytes / 1e6)
        return report

    def _rows_replaced(self, collection: str) -> None:
        """A rebuild replaced ivf_pq's rows file: the index files saved before name the old rows."""
        snapshots.invalidate(collection, self.files_dir)

    def save_index_files(self) -> None:
        """Write the files of every collection changed since they were last
        written (the caller holds the write lock, or no writes can come)."""
        self.snapshots.save_changed(self.store.collections(), self.index, self.derived)

    def _load_rows(self, collections: dict[str, Collection]) -> int:
        path = self.store.path
        count = 0
        for collection, name, dim, blob in self.store.iter_rows(list(collections)):
            coll = collections.get(collection)
            if coll is None:
                raise StoreError(f"{path}: vector {name!r} belongs to collection {collection!r}, which is not in "
                                 "the collections table: the database is damaged")
            if dim != coll.dim or not isinstance(blob, bytes) or len(blob) != coll.dim * STORED_DTYPE.itemsize:
                size = len(blob) if isinstance(blob, (bytes, str)) else type(blob).__name__
                raise StoreError(
                    f"{path}: vector {name!r} of collection {collection!r} has dim {dim} and a {size}-byte BLOB; "
                    f"the collection's dimension is {coll.dim} ({coll.dim * STORED_DTYPE.itemsize} bytes): "
                    "the database is damaged")
            coll.load_row(name, np.frombuffer(blob, dtype=STORED_DTYPE))
            count += 1
        return count

    def close(self) -> None:
        """Wait for the write in flight, write the index files of collections
        changed since they were written, then close the database."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            self.index.stop_background()  # no swap may change a collection while its files are written
            self.derived.stop()
            if self._ready:
                try:
                    self.save_index_files()
                except StoreError as exc:
                    log.warning("index files not written: %s", exc)
            self.store.close()
            for coll in self.index.collections():
                coll.close()
        log.info("closed %s", self.store.path)

    # ------------------------------------------------------------ writes

    def upsert_job(self) -> SqliteUpsertJob:
        """An upsert fed one item at a time (an async server reads its stream
        without a thread): `add` is quick; `flush` and `finish` write to SQLite."""
        self._require_ready()
        return SqliteUpsertJob(self)

    def _commit(self, batch: list[Pending]) -> tuple[int, int, errors.ImageSearchError | None]:
        """Commit the longest valid prefix of `batch` (checked against the
        collections as they are now), then apply it to memory. Returns
        (inserted, replaced, the error of the first invalid item or None)."""
        with self._write_lock:
            if self._closed:
                raise errors.Unavailable("the ranker is shutting down")
            specs: dict[str, tuple[int, str]] = {}
            new_collections: list[tuple[str, int, str]] = []
            ok: list[Pending] = []
            failure = None
            for p in batch:
                coll = self.index.find(p.collection)
                spec = (coll.dim, coll.fingerprint) if coll is not None else specs.get(p.collection)
                try:
                    if spec is None:
                        self.aliases.check_new_collection(p.collection)  # an alias made since the call resolved it
                        specs[p.collection] = (p.vector.shape[0], p.fingerprint)
                        new_collections.append((p.collection, p.vector.shape[0], p.fingerprint))
                    else:
                        validation.check_fits(p.collection, *spec, p)
                except errors.ImageSearchError as exc:
                    failure = exc
                    break
                ok.append(p)
            if not ok:
                return 0, 0, failure
            now = time.time()
            rows = [UpsertRow(p.collection, p.name, p.vector, p.fingerprint, validation.to_json(p.attributes))
                    for p in ok]
            existing = self.store.upsert(rows, new_collections, now)
            inserted = replaced = 0
            seen = set(existing)
            by_collection: dict[str, tuple[list[str], list[np.ndarray]]] = {}
            for p in ok:
                key = (p.collection, p.name)
                if key in seen:
                    replaced += 1
                else:
                    inserted += 1
                    seen.add(key)
                names, vectors = by_collection.setdefault(p.collection, ([], []))
                names.append(p.name)
                vectors.append(p.vector)
            try:
                for collection, (names, vectors) in by_collection.items():
                    fingerprint = specs[collection][1] if collection in specs else ""  # used if new
                    self.index.upsert(collection, names, np.stack(vectors), fingerprint, now)
                for p in ok:
                    self.attributes.table(p.collection).set([(p.name, p.attributes)])
                self._note_writes(by_collection)
            except Exception as exc:  # pragma: no cover - e.g. MemoryError
                log.exception("committed %d items but could not add them to memory", len(ok))
                raise errors.ImageSearchError(
                    f"{len(ok)} items were committed to the database but could not be added to memory ({exc!r}): "
                    "restart the ranker to load them") from exc
            return inserted, replaced, failure

    def delete(self, collection: str, names: Sequence[str]) -> DeleteResult:
        self._require_ready()
        validation.check_delete(collection, names)
        with self._write_lock:
            if self._closed:
                raise errors.Unavailable("the ranker is shutting down")
            coll = self.index.get(collection)
            now = time.time()
            deleted = self.store.delete(collection, names, now)
            coll.delete(deleted, now)
            self.attributes.table(collection).delete(deleted)
            self._note_writes([collection])
        gone = set(deleted)
        return DeleteResult(len(deleted), [n for n in dict.fromkeys(names) if n not in gone])

    def create_collection(self, collection: str, dim: int, fingerprint: str,
                          spec: IndexSpec) -> tuple[CollectionStats, bool]:
        """Create an empty collection of this kind; (its stats, True). An
        existing collection with the same dimension, fingerprint and index
        options is no error: (its stats, False); with others, AlreadyExists."""
        self._require_ready()
        validation.check_new_collection(collection, dim, spec)
        with self._write_lock:
            if self._closed:
                raise errors.Unavailable("the ranker is shutting down")
            self.aliases.check_new_collection(collection)
            coll = self.index.find(collection)
            if coll is not None:
                validation.check_same_collection(collection, (coll.dim, coll.fingerprint, coll.spec),
                                                 (dim, fingerprint, spec))
                return coll.stats(), False
            stored = self.store.create_collection(collection, dim, fingerprint, spec.kind, spec.to_json())
            coll = self.index.create(collection, dim, fingerprint, spec, created_at=stored.created_at,
                                     updated_at=stored.updated_at)
            self._generations[collection] = stored.generation
            self.derived.track(coll, stored.generation)
        log.info("created collection %r (dim %d, %s %s)", collection, dim, spec.label, spec.params())
        return coll.stats(), True

    def drop_collection(self, collection: str) -> int:
        """Delete a collection, its vectors and its index files; returns how many vectors it held."""
        self._require_ready()
        validation.check_collection(collection, what="drop collection")
        with self._write_lock:
            if self._closed:
                raise errors.Unavailable("the ranker is shutting down")
            self.aliases.check_drop(collection)
            self.index.get(collection)  # NotFound if unknown
            count = self.store.drop_collection(collection)
            self.index.drop(collection)
            self.snapshots.forget(collection)
            self.attributes.drop(collection)
            self._generations.pop(collection, None)
            self.derived.drop(collection)
        log.info("dropped collection %r (%d vectors)", collection, count)
        return count

    def rename(self, collection: str, renamings: Sequence[tuple[str, str]], in_order: bool = False) -> RenameResult:
        """New names for items, keeping their vectors and attributes; applied
        in order, a target that exists is replaced (like `mv`)."""
        self._require_ready()
        validation.check_renamings(collection, renamings, in_order)
        with self._write_lock:
            if self._closed:
                raise errors.Unavailable("the ranker is shutting down")
            coll = self.index.get(collection)
            now = time.time()
            done = self.store.rename(collection, list(renamings), now)
            coll.rename(done, now)  # memory: the same vectors under the new names, in one step
            self.attributes.table(collection).rename(done)
            self._note_writes([collection])
        return RenameResult(len(done), not_renamed(renamings, done))

    # ------------------------------------------------------------ reads

    def _allowed(self, query: Query) -> set[str] | None:
        if not query.filters:
            return None
        return self.attributes.table(query.collection).matching(query.filters)

    def _with_attributes(self, query: Query, found: list[Match]) -> list[Match]:
        if not query.with_attributes:
            return found
        table = self.attributes.table(query.collection)
        return [dataclasses.replace(m, attributes=dict(table.get(m.name))) for m in found]

    def search(self, query: Query) -> list[Match]:
        self._require_ready()
        if query.reranked:
            found = self._search_reranked(query, validation.describe_query(query), self._allowed(query))
        else:
            found = self.index.search(query, allowed=self._allowed(query))
        return self._with_attributes(query, found)

    def search_many(self, queries: Sequence[Query]) -> list[list[Match] | errors.ImageSearchError]:
        """Plain unfiltered queries of one collection share one matrix product;
        queries with query expansion or k-reciprocal re-ranking run one by one.
        Either way an answer never depends on the other queries of the batch."""
        self._require_ready()
        allowed = [self._allowed(q) if q.collection in self.index else None for q in queries]
        special = [i for i, q in enumerate(queries) if q.reranked]
        plain = sorted(set(range(len(queries))) - set(special))
        results: list = [None] * len(queries)
        if plain:
            for i, r in zip(plain, self.index.search_many([queries[i] for i in plain], [allowed[i] for i in plain])):
                results[i] = r
        for i in special:
            try:
                results[i] = self._search_reranked(queries[i], validation.describe_query(queries[i], i), allowed[i])
            except errors.ImageSearchError as exc:
                results[i] = exc
        return [r if isinstance(r, errors.ImageSearchError) else self._with_attributes(q, r)
                for q, r in zip(queries, results)]

    # ------------------------------------------------------------ re-ranking (rerank/)

    def _note_writes(self, collections: Iterable[str]) -> None:
        """After a write is in memory (write lock held): the collections'
        generations, which make their derived data stale (rerank/cache.py)."""
        for collection in collections:
            generation = self.store.generation(collection)
            if generation is not None:
                self._generations[collection] = generation
                coll = self.index.find(collection)
                if coll is not None:
                    self.derived.note_write(coll, generation)

    def derived_pending(self, query: Query) -> Wait | None:
        """None when the derived data a query needs is current (or it needs
        none, or its collection is unknown); else a future done once it is
        (the servicer awaits it on the event loop, holding no thread)."""
        if not self._ready or query.collection not in self.index:
            return None
        try:  # a query the search will refuse starts no rebuild
            coll, _, _ = self.index.prepare(query, validation.describe_query(query))
        except errors.ImageSearchError:
            return None
        return self.derived.pending(coll.name, needs(query))

    def _search_reranked(self, query: Query, what: str, allowed: set[str] | None) -> list[Match]:
        coll, q64, k = self.index.prepare(query, what)
        return matches(reranked_search(coll, q64, k, query, self.derived, allowed))

    def list_items(self, collection: str, *, page_size: int = 0, start_after: str = "", limit: int = 0,
                   filters: Sequence[AttributeFilter] = (), with_vectors: bool = False) -> Iterator[ItemPage]:
        """Pages of a collection's items in name order (see ListItems). Each page
        is one read (a snapshot); a short page ends the listing, so a listing of
        one page is a snapshot too. Pages after the first continue after the
        last name sent, as a cursor does: a rename between them shows."""
        self._require_ready()
        page_size = validation.check_list_items(collection, page_size, limit)
        self.index.get(collection)  # NotFound for an unknown collection
        left = limit or None
        after = start_after
        while left is None or left > 0:
            want = page_size if left is None else min(page_size, left)
            rows = self.store.items(collection, after, want, with_vectors=with_vectors)
            if not rows:
                return
            after, last = rows[-1].name, len(rows) < want  # a short read: the end
            if filters:
                rows = [r for r in rows if validation.passes(validation.from_json(r.attributes), filters)]
            if rows:
                if left is not None:
                    left -= len(rows)
                yield ItemPage(rows, after)
            if last:
                return

    def stats(self, collection: str | None = None) -> list[CollectionStats]:
        self._require_ready()
        if collection:
            validation.check_collection(collection, what="stats")
        return [dataclasses.replace(s, memory_bytes=s.memory_bytes + self.derived.nbytes(s.name),
                                    derived=self.derived.status(s.name))
                for s in self.index.stats(collection or None)]

    def memory_bytes(self) -> int:
        """Indexes plus derived data (k-reciprocal neighbourhoods)."""
        return sum(s.memory_bytes + self.derived.nbytes(s.name) for s in self.index.stats())

    def backup(self):
        """A checked copy of the database in a temporary file (sqlite/backup.py)."""
        return backup_copy(self.store)


class SqliteUpsertJob(UpsertJob):
    """The SQLite backend's upsert job (backend.py): an item is checked
    against its collection (or against the first item of a collection this
    call creates) as it is added."""

    def __init__(self, backend: SqliteBackend):
        super().__init__(backend)
        self._pending_specs: dict[str, tuple[int, str]] = {}  # collections first seen in `pending`

    def _prepare(self, index: int, item: UpsertItem) -> Pending:
        p = validation.pending_item(index, item)
        coll = self._backend.index.find(p.collection)
        spec = (coll.dim, coll.fingerprint) if coll is not None else self._pending_specs.get(p.collection)
        if spec is None:
            self._pending_specs[p.collection] = (p.vector.shape[0], p.fingerprint)
        else:
            validation.check_fits(p.collection, *spec, p)
        return p

    def flush(self) -> None:
        if not self._pending:
            return
        batch = list(self._pending)
        self._pending.clear()
        self._pending_specs.clear()
        _, _, failure = self._commit_batch(batch, self._backend._commit)
        if failure is not None:
            raise with_progress(failure, self.committed)
