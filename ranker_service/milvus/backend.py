"""The ranker's Milvus backend (`MilvusBackend`): the same interface as the
SQLite backend (backend.RankerBackend), over Milvus collections through
pymilvus (`--backend milvus --milvus-uri URI`: a server or cluster, or a
milvus-lite file). Milvus is then the source of truth; this process keeps no
vectors and no settings past a call: each collection's settings live in a
Milvus collection so that several rankers can serve one Milvus. It keeps to a Milvus
*server's* limits (names, dimension, top-k) and ranks as the SQLite backend
does (float64, ties by name): docs/ranker.md#milvus-backend.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from imagesearch import errors
from imagesearch.defaults import FILTER_EXACT_SCAN_SHARE
from ranker_service import validation
from ranker_service.backend import DEFAULT_BATCH_SIZE, BackendBase, deadline_of
from ranker_service.milvus.aliases import MilvusAliases
from ranker_service.milvus.link import Link, not_found
from ranker_service.milvus.ranking import rank_rows
from ranker_service.milvus.schema import (
    ALIASES,
    CONSISTENCY,
    MAX_DIM,
    MAX_SEARCH_LIMIT,
    MIN_DIM,
    SETTINGS,
    Coll,
    collection_schema,
    filter_expression,
    index_params,
    milvus_name,
)
from ranker_service.milvus.upsert import MilvusUpsertJob
from ranker_service.rerank.maths import expand_query
from ranker_service.types import (
    EXACT,
    IVF_PQ,
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
    StoredItem,
)

log = logging.getLogger(__name__)

class MilvusBackend(BackendBase):
    """`RankerBackend` over Milvus. Thread-safe. `load()` connects once;
    `follow()` instead loads when Milvus first answers, then keeps following
    its reachability (link.py). Every call asks Milvus whether the collection
    it names exists and which incarnation it is (`_find`), so that what another
    ranker creates, drops or makes again is seen on the next call; only the
    settings of an incarnation, which never change, are kept."""

    LOADING = "the ranker is still connecting to Milvus: retry shortly"

    def __init__(self, uri: str, token: str = "", *, batch_size: int = DEFAULT_BATCH_SIZE, timeout: float = 10.0):
        super().__init__(batch_size)
        self.uri, self.token, self.timeout = uri, token, timeout
        self.link = Link(uri, token, timeout)
        self._known: dict[str, tuple[int, Coll]] = {}  # Milvus collection -> (its id, its settings), loaded
        self._lock = threading.Lock()  # collection and alias changes
        self.aliases = MilvusAliases(self)

    @property
    def client(self):
        return self.link.client

    # ------------------------------------------------------------ life cycle

    def load(self) -> LoadReport:
        """Connect, make the settings collection where missing, and load every
        collection (a restarted Milvus has released them)."""
        start = time.perf_counter()
        try:
            self.link.connect()
            self._known.clear()
            for name in (SETTINGS, ALIASES):
                if not self._call("checking the settings collections", "has_collection", name):
                    self._create_settings(name)
                self._call("loading the settings collections", "load_collection", name)
            colls = self._all()
            count = 0
            for coll in colls:
                self._call(f"loading collection {coll.name!r}", "load_collection", coll.key)
                count += self._count(coll)
        except errors.ImageSearchError as exc:
            raise errors.StoreError(f"cannot use Milvus at {self.uri}: {exc}") from exc
        self._ready = True
        report = LoadReport(len(colls), count, time.perf_counter() - start, 0)
        log.info("loaded %d vectors in %d collections from Milvus at %s in %.2fs", count, len(colls),
                 self.uri, report.seconds)
        return report

    def follow(self, on_loaded: Callable[[], None], on_health: Callable[[bool], None]) -> None:
        """Load in the background once Milvus answers (`on_loaded()` then), and
        follow its reachability: `on_health(False)` while it is unreachable,
        `on_health(True)` once it answers again and what it released is loaded."""
        def on_up():
            first = not self._ready
            self.load()
            if first:
                on_loaded()
        self.link.watch(on_up, on_health)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.link.close()
        log.info("closed the Milvus connection to %s", self.uri)

    def _call(self, doing: str, method, *args, **kwargs):
        """`client.method(...)` through the link (a timeout; UNAVAILABLE when
        Milvus fails); a collection a restarted Milvus released is loaded again
        and the call tried once more."""
        try:
            return self.link.call(doing, method, *args, **kwargs)
        except errors.Unavailable as exc:
            if "not loaded" not in str(exc) or not args or not isinstance(args[0], str):
                raise
        self.link.call(f"loading {args[0]}", "load_collection", args[0])
        return self.link.call(doing, method, *args, **kwargs)

    # ------------------------------------------------------------ settings

    def _create_settings(self, name: str) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=255)
        schema.add_field("settings", DataType.VARCHAR, max_length=65535)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector field
        index = self.client.prepare_index_params()
        index.add_index(field_name="v", index_type="FLAT", metric_type="IP")
        self._call("making the settings collections", "create_collection", name, schema=schema,
                   index_params=index, consistency_level=CONSISTENCY)

    def _from_row(self, row: dict) -> Coll:
        s = json.loads(row["settings"])
        spec = validation.spec_from_json(s["kind"], json.dumps(s["params"]))
        return Coll(s["name"], int(s["dim"]), s["fingerprint"], spec, float(s["created_at"]), float(s["updated_at"]))

    def _write_settings(self, coll: Coll) -> None:
        settings = {"name": coll.name, "dim": coll.dim, "fingerprint": coll.fingerprint, "kind": coll.spec.kind,
                    "params": coll.spec.params(), "created_at": coll.created_at, "updated_at": coll.updated_at}
        self._call(f"saving collection {coll.name!r}'s settings", "upsert", SETTINGS,
                   [{"key": coll.key, "settings": json.dumps(settings), "v": [1.0, 0.0]}])

    def _all(self) -> list[Coll]:
        rows = self._call("reading collection settings", "query", SETTINGS, filter='key != ""',
                          output_fields=["settings"], consistency_level=CONSISTENCY)
        return sorted((self._from_row(r) for r in rows), key=lambda c: c.name)

    def _find(self, collection: str) -> Coll | None:
        """The collection's settings (None: no such collection); given an alias,
        those of its collection (Coll.name tells). Milvus's own metadata says
        at once whether it exists, which collection an alias names, and which
        incarnation it is (its id: dropped and made again, even by another ranker, it has another);
        the settings of an id never change, so they are read once per id (a
        Strong read costs a time tick) and the collection loaded then."""
        key = milvus_name(collection)
        try:
            described = self.link.call("looking up the collection", "describe_collection", key)
        except errors.Unavailable as exc:
            if self.link.unreachable_now(exc) or not not_found(exc):
                raise
            self._known.pop(key, None)
            return None
        cid, key = described.get("collection_id"), described.get("collection_name", key)  # an alias resolved
        known = self._known.get(key)
        if known is not None and known[0] == cid:
            return known[1]
        rows = self._call("reading collection settings", "get", SETTINGS, ids=[key], output_fields=["settings"],
                          consistency_level=CONSISTENCY)
        if not rows:  # being made or dropped by another ranker right now
            return None
        coll = self._from_row(rows[0])
        self._call(f"loading collection {collection!r}", "load_collection", key)
        self._known[key] = (cid, coll)
        return coll

    def _get(self, collection: str) -> Coll:
        coll = self._find(collection)
        if coll is None:
            raise validation.unknown_collection(collection, [c.name for c in self._all()])
        return coll

    def _create(self, collection: str, dim: int, fingerprint: str, spec: IndexSpec) -> Coll:
        if not MIN_DIM <= dim <= MAX_DIM:
            raise errors.InvalidArgument(
                f"collection {collection!r}: dimension {dim} is outside Milvus's limits {MIN_DIM}..{MAX_DIM}")
        if spec.float16:
            raise errors.InvalidArgument("the Milvus backend keeps float32 vectors: float16 is not available")
        now = time.time()
        coll = Coll(collection, dim, fingerprint, spec, now, now)
        schema = collection_schema(dim)
        index_type, build, _ = index_params(spec)
        index = self.client.prepare_index_params()
        index.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=build)
        try:
            self.link.call(f"making {collection!r}", "create_collection", coll.key, schema=schema,
                           index_params=index, consistency_level=CONSISTENCY)
            self.link.call(f"loading {collection!r}", "load_collection", coll.key)
        except errors.Unavailable as exc:
            if self.link.unreachable_now(exc):
                raise
            try:
                self.client.drop_collection(coll.key)
            except Exception as cleanup:  # noqa: BLE001 - best effort; the first error is the one to report
                log.warning("could not drop the half-made collection %s: %s", coll.key, cleanup)
            raise errors.FailedPrecondition(
                f"Milvus at {self.uri} cannot make a {spec.label} collection {collection!r}: "
                f"{exc.__cause__ or exc}") from exc
        self._write_settings(coll)
        log.info("created Milvus collection %s for %r (dim %d, %s)", coll.key, collection, dim, index_type)
        return coll

    # ------------------------------------------------------------ writes

    def create_collection(self, collection: str, dim: int, fingerprint: str,
                          spec: IndexSpec) -> tuple[CollectionStats, bool]:
        self._require_ready()
        validation.check_new_collection(collection, dim, spec, MIN_DIM, MAX_DIM)
        with self._lock:
            self.aliases.check_new_collection(collection)
            coll = self._find(collection)
            if coll is not None:
                validation.check_same_collection(collection, (coll.dim, coll.fingerprint, coll.spec),
                                                 (dim, fingerprint, spec))
                return self._stats(coll), False
            coll = self._create(collection, dim, fingerprint, spec)
        return self._stats(coll), True

    def drop_collection(self, collection: str) -> int:
        self._require_ready()
        validation.check_collection(collection, what="drop collection")
        with self._lock:
            self.aliases.check_drop(collection)
            coll = self._get(collection)
            count = self._count(coll)
            self._call(f"dropping {collection!r}", "drop_collection", coll.key)
            self._call(f"dropping {collection!r}", "delete", SETTINGS, ids=[coll.key])
            self._known.pop(coll.key, None)
        return count

    def upsert_job(self) -> "MilvusUpsertJob":
        """An upsert fed one item at a time: `add` validates (no Milvus call);
        `flush` and `finish` create collections and write (blocking)."""
        self._require_ready()
        return MilvusUpsertJob(self)

    def _commit(self, batch: list[Pending]) -> tuple[int, int]:
        now = time.time()
        by_coll: dict[str, dict[str, Pending]] = {}
        for p in batch:
            by_coll.setdefault(p.collection, {})[p.name] = p  # the last of repeated names wins
        inserted = replaced = 0
        for collection, items in by_coll.items():
            coll = self._get(collection)
            existing = {r["name"]: r["created_at"] for r in self._call(
                "looking up names", "get", coll.key, ids=list(items), output_fields=["name", "created_at"])}
            rows = [{"name": name, "vector": p.vector.tolist(), "created_at": existing.get(name, now),
                     "updated_at": now, "attributes": p.attributes} for name, p in items.items()]
            self._call(f"upserting {len(rows)} items", "upsert", coll.key, rows)
            seen = set(existing)
            for p in batch:
                if p.collection != collection:
                    continue
                if p.name in seen:
                    replaced += 1
                else:
                    inserted += 1
                    seen.add(p.name)
            coll.updated_at = now
            self._write_settings(coll)
        return inserted, replaced

    def delete(self, collection: str, names: Sequence[str]) -> DeleteResult:
        self._require_ready()
        validation.check_delete(collection, names)
        coll = self._get(collection)
        wanted = list(dict.fromkeys(names))
        found = {r["name"] for r in self._call("looking up names", "get", coll.key, ids=wanted,
                                               output_fields=["name"])} if wanted else set()
        existing = [n for n in wanted if n in found]
        if existing:
            self._call(f"deleting {len(existing)} names", "delete", coll.key, ids=existing)
            coll.updated_at = time.time()
            self._write_settings(coll)
        return DeleteResult(len(existing), [n for n in wanted if n not in found])

    # ------------------------------------------------------------ reads

    def _prepare(self, query: Query, what: str) -> tuple[Coll, np.ndarray, int]:
        k = validation.check_query(query, what)
        coll = self._get(query.collection)
        return coll, validation.query_vector(query, what, coll.name, coll.dim, coll.fingerprint), k

    def _search(self, coll: Coll, q64: np.ndarray, k: int, query: Query | None = None) -> list[Match]:
        _, _, search_params = index_params(coll.spec)
        exact = coll.spec.kind == EXACT
        fetch = min(MAX_SEARCH_LIMIT, max(2 * k, k + 64) if exact else coll.spec.candidates(k, MAX_SEARCH_LIMIT))
        q32 = q64.astype(np.float32).tolist()
        expr = filter_expression(query.filters) if query is not None and query.filters else ""
        fields = ["vector", "attributes"] if query is not None and query.with_attributes else ["vector"]
        hit_fields = fields[1:]  # the vectors come after (_hit_rows)
        if expr and not exact:
            passing = self._count(coll, expr)
            if passing <= FILTER_EXACT_SCAN_SHARE * self._count(coll):  # selective: scan the passing rows
                return rank_rows(self._call("reading filtered rows", "query", coll.key, filter=expr,
                                             output_fields=["name", *fields], consistency_level=CONSISTENCY),
                                  q64, k, query)
        while True:
            (hits,) = self._call("searching", "search", coll.key, data=[q32], limit=fetch, filter=expr,
                                 output_fields=hit_fields, consistency_level=CONSISTENCY,
                                 search_params={"metric_type": "IP", "params": search_params})
            names = [h["name"] if "name" in h else h["id"] for h in hits]
            if not exact or len(hits) < fetch or fetch >= MAX_SEARCH_LIMIT or len(hits) <= k:
                break
            # FLAT scores are float32: the float64 top-k is surely inside only if
            # the last fetched score is below the k-th by more than the margin.
            if hits[-1]["distance"] < hits[k - 1]["distance"] - coll.margin:
                break
            fetch = min(MAX_SEARCH_LIMIT, 4 * fetch)
        if expr and len(hits) < k and len(hits) < self._count(coll, expr):  # the ANN search missed some
            return rank_rows(self._call("reading filtered rows", "query", coll.key, filter=expr,
                                         output_fields=["name", *fields], consistency_level=CONSISTENCY),
                              q64, k, query)
        return rank_rows(self._hit_rows(coll, names, hits, q32), q64, k, query)

    def _hit_rows(self, coll: Coll, names: list[str], hits: list[dict], q32: list[float]) -> list[dict]:
        """The hits with their vectors. A search returning vectors costs Milvus a
        second wait for a time tick (it queries them again, Strong), so they are
        read after the search without one: the search already waited, and a
        replica reads forward from there. A vector whose float32 score is not the
        search's (a replica behind, or the item replaced since) or that did not come
        back is read again, Strong; IVF_PQ's scores are approximate: all are."""
        rows = {n: {"name": n, **h.get("entity", {})} for n, h in zip(names, hits)}
        scores = {n: h["distance"] for n, h in zip(names, hits)}
        wanted = list(rows) if coll.spec.kind == IVF_PQ else []
        if not wanted and rows:
            got = {r["name"]: r["vector"] for r in self._call(
                "reading vectors", "get", coll.key, ids=list(rows), output_fields=["name", "vector"],
                consistency_level="Eventually")}
            q = np.asarray(q32, dtype=np.float32)
            for n in rows:
                if n in got and abs(float(np.dot(np.asarray(got[n], dtype=np.float32), q)) - scores[n]) <= 1e-4:
                    rows[n]["vector"] = got[n]
                else:
                    wanted.append(n)
        if wanted:
            for r in self._call("reading vectors", "get", coll.key, ids=wanted, output_fields=["name", "vector"],
                                consistency_level=CONSISTENCY):
                rows[r["name"]]["vector"] = r["vector"]
        return [r for r in rows.values() if "vector" in r]  # one deleted since the search is gone

    def _answer(self, query: Query, what: str) -> list[Match]:
        """One query; with query expansion, the first pass's vectors come back
        from Milvus (get by name) and the expanded query is searched again."""
        coll, q64, k = self._prepare(query, what)
        if query.k_reciprocal is not None:
            raise errors.FailedPrecondition(
                f"{what}: k-reciprocal re-ranking needs gallery-to-gallery neighbourhoods, which the Milvus "
                "backend does not compute: use the SQLite backend (--backend sqlite)")
        if query.expansion is not None:
            top = self._search(coll, q64, query.expansion.top_n, query)
            if top:
                rows = self._call("reading vectors", "get", coll.key, ids=[m.name for m in top],
                                  output_fields=["name", "vector"])
                by_name = {r["name"]: r["vector"] for r in rows}
                kept = [m for m in top if m.name in by_name]
                if kept:
                    q64 = expand_query(q64, np.asarray([by_name[m.name] for m in kept], dtype=np.float32),
                                       [m.score for m in kept], query.expansion.alpha)
        return self._search(coll, q64, k, query)

    def search(self, query: Query) -> list[Match]:
        self._require_ready()
        with deadline_of(query.deadline):
            return self._answer(query, validation.describe_query(query))

    def derived_pending(self, query: Query) -> None:
        """No derived data here (k-reciprocal is refused): never waits."""
        return None

    def search_many(self, queries: Sequence[Query]) -> list[list[Match] | errors.ImageSearchError]:
        self._require_ready()
        results: list[list[Match] | errors.ImageSearchError] = []
        for i, query in enumerate(queries):
            try:
                with deadline_of(query.deadline):
                    results.append(self._answer(query, validation.describe_query(query, i)))
            except errors.ImageSearchError as exc:
                results.append(exc)
        return results

    def _count(self, coll: Coll, expr: str = "") -> int:
        rows = self._call("counting", "query", coll.key, filter=expr, output_fields=["count(*)"],
                          consistency_level=CONSISTENCY)
        return int(rows[0]["count(*)"])

    def list_items(self, collection: str, *, page_size: int = 0, start_after: str = "", limit: int = 0,
                   filters: Sequence[AttributeFilter] = (), with_vectors: bool = False):
        """Pages of items in name order: the (filtered) names first, sorted
        here (Milvus queries are unordered), then each page's rows by name."""
        self._require_ready()
        size = validation.check_list_items(collection, page_size, limit)
        coll = self._get(collection)
        expr = " and ".join(e for e in (f"name > {json.dumps(start_after)}" if start_after else "",
                                        filter_expression(filters)) if e)
        iterator = self._call("listing names", "query_iterator", coll.key, batch_size=1000,
                              filter=expr, output_fields=["name"], consistency_level=CONSISTENCY)
        names = []
        while True:
            batch = self._call("listing names", iterator.next)
            if not batch:
                break
            names.extend(r["name"] for r in batch)
        iterator.close()
        names.sort()
        if limit:
            names = names[:limit]
        fields = ["name", "attributes", "created_at", "updated_at"] + (["vector"] if with_vectors else [])
        for start in range(0, len(names), size):
            page = names[start:start + size]
            rows = {r["name"]: r for r in self._call("reading items", "get", coll.key, ids=page,
                                                     output_fields=fields)}
            items = [StoredItem(n, validation.to_json(rows[n].get("attributes") or {}), rows[n]["created_at"],
                                rows[n]["updated_at"], coll.fingerprint,
                                np.asarray(rows[n]["vector"], dtype=np.float32) if with_vectors else None)
                     for n in page if n in rows]
            yield ItemPage(items, page[-1])

    def rename(self, collection: str, renamings: Sequence[tuple[str, str]], in_order: bool = False) -> RenameResult:
        """Each renaming as an upsert of the row under its new name, then a
        delete of the old name (in order; a target that exists is replaced)."""
        self._require_ready()
        validation.check_renamings(collection, renamings, in_order)
        coll = self._get(collection)
        done, not_found = 0, []
        with self._lock:
            for old, new in renamings:
                rows = self._call("reading an item", "get", coll.key, ids=[old],
                                  output_fields=["name", "vector", "attributes", "created_at"])
                if not rows:
                    not_found.append(old)
                    continue
                done += 1
                if new == old:
                    continue
                row = rows[0]
                self._call("renaming", "upsert", coll.key, [{
                    "name": new, "vector": list(row["vector"]), "created_at": row["created_at"],
                    "updated_at": time.time(), "attributes": row.get("attributes") or {}}])
                self._call("renaming", "delete", coll.key, ids=[old])
            if done:
                coll.updated_at = time.time()
                self._write_settings(coll)
        return RenameResult(done, not_found)

    def _stats(self, coll: Coll) -> CollectionStats:
        return CollectionStats(coll.name, self._count(coll), coll.dim, coll.fingerprint, 0, coll.created_at,
                               coll.updated_at, coll.spec)

    def stats(self, collection: str | None = None) -> list[CollectionStats]:
        self._require_ready()
        if collection:
            validation.check_collection(collection, what="stats")
            coll = self._get(collection)  # then its settings as they are now (updated_at)
            return [self._stats(next((c for c in self._all() if c.name == collection), coll))]
        return [self._stats(coll) for coll in self._all()]

    def memory_bytes(self) -> int:
        return 0  # the vectors live in Milvus

    def backup(self):
        raise errors.FailedPrecondition(
            "Backup copies the SQLite backend's database; with --backend milvus the vectors live in Milvus: "
            "back them up with Milvus's own tools (e.g. milvus-backup)")
