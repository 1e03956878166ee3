"""The ranker's Milvus backend (`MilvusBackend`): the same interface as the
SQLite backend (backend.RankerBackend), over Milvus collections through
pymilvus (`--backend milvus --milvus-uri URI`: a server or cluster, or a
milvus-lite file). Milvus is then the source of truth; this process keeps no
vectors, only a cache of each collection's settings, which live in a Milvus
collection so that several rankers can serve one Milvus. It keeps to a Milvus
*server's* limits (names, dimension, top-k) and ranks as the SQLite backend
does (float64, ties by name): docs/ranker.md#milvus-backend.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Sequence

import numpy as np

from imagesearch import errors
from imagesearch.defaults import FILTER_EXACT_SCAN_SHARE
from ranker_service import validation
from ranker_service.backend import DEFAULT_BATCH_SIZE, BackendBase, UpsertJob
from ranker_service.rerank.maths import expand_query
from ranker_service.topk import rank_exact, score_margin
from ranker_service.types import (
    EXACT,
    HNSW,
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
    UpsertItem,
)

log = logging.getLogger(__name__)

MIN_DIM, MAX_DIM = 2, 32768
MAX_SEARCH_LIMIT = 16384
MAX_NAME_BYTES = 16384
SETTINGS = "imagesearch_collections"
CONSISTENCY = "Strong"
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_]")


def milvus_name(collection: str) -> str:
    """A Milvus collection name for ours: allowed characters only, unique by hash."""
    readable = _NOT_ALLOWED.sub("_", collection)[:40]
    return f"is_{readable}_{hashlib.sha256(collection.encode('utf-8')).hexdigest()[:16]}"


def filter_expression(filters: Sequence[AttributeFilter]) -> str:
    """A Milvus boolean expression over the JSON `attributes` field: each
    filter an OR of equalities, all ANDed. Keys and values go in as JSON string
    literals (double quotes, backslash escapes: Milvus's string syntax)."""
    def literal(text: str) -> str:
        return json.dumps(text, ensure_ascii=False)

    def one(f: AttributeFilter) -> str:  # (milvus-lite's parser takes no JSON path left of `in`)
        return "(" + " or ".join(f"attributes[{literal(f.key)}] == {literal(v)}" for v in sorted(f.values)) + ")"

    return " and ".join(one(f) for f in filters)


def _index_params(spec: IndexSpec) -> tuple[str, dict, dict]:
    """(Milvus index type, build params, search params) for a spec."""
    if spec.kind == HNSW:
        return "HNSW", {"M": spec.hnsw_m, "efConstruction": spec.ef_construction}, {"ef": spec.ef_search}
    if spec.kind == IVF_PQ:
        return "IVF_PQ", {"nlist": spec.nlist, "m": spec.pq_bytes, "nbits": 8}, {"nprobe": spec.nprobe}
    return "FLAT", {}, {}


class _Coll:
    def __init__(self, name: str, dim: int, fingerprint: str, spec: IndexSpec, created_at: float,
                 updated_at: float):
        self.name, self.dim, self.fingerprint, self.spec = name, dim, fingerprint, spec
        self.created_at, self.updated_at = created_at, updated_at
        self.key = milvus_name(name)
        self.margin = score_margin(dim)


class MilvusBackend(BackendBase):
    """`RankerBackend` over Milvus. Thread-safe. `load()` connects."""

    LOADING = "the ranker is still connecting to Milvus: retry shortly"

    def __init__(self, uri: str, token: str = "", *, batch_size: int = DEFAULT_BATCH_SIZE, timeout: float = 60.0):
        super().__init__(batch_size)
        self.uri, self.token, self.timeout = uri, token, timeout
        self.client = None
        self._colls: dict[str, _Coll] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ life cycle

    def load(self) -> LoadReport:
        from pymilvus import MilvusClient

        start = time.perf_counter()
        try:
            self.client = MilvusClient(uri=self.uri, token=self.token, timeout=self.timeout)
            if not self.client.has_collection(SETTINGS):
                self._create_settings()
            self.client.load_collection(SETTINGS)
            rows = self.client.query(SETTINGS, filter='key != ""', output_fields=["*"], consistency_level=CONSISTENCY)
        except Exception as exc:
            raise errors.StoreError(f"cannot use Milvus at {self.uri}: {exc}") from exc
        count = 0
        for row in rows:
            coll = self._from_row(row)
            self.client.load_collection(coll.key)
            self._colls[coll.name] = coll
            count += self._count(coll)
        self._ready = True
        report = LoadReport(len(self._colls), count, time.perf_counter() - start, 0)
        log.info("loaded %d vectors in %d collections from Milvus at %s in %.2fs", count, len(self._colls),
                 self.uri, report.seconds)
        return report

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self.client is not None:
                self.client.close()
        log.info("closed the Milvus connection to %s", self.uri)

    def _call(self, doing: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except errors.ImageSearchError:
            raise
        except Exception as exc:
            raise errors.Unavailable(f"{doing}: Milvus failed, retry later: {exc}") from exc

    # ------------------------------------------------------------ settings

    def _create_settings(self) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=255)
        schema.add_field("settings", DataType.VARCHAR, max_length=65535)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector field
        index = self.client.prepare_index_params()
        index.add_index(field_name="v", index_type="FLAT", metric_type="IP")
        self.client.create_collection(SETTINGS, schema=schema, index_params=index, consistency_level=CONSISTENCY)

    def _from_row(self, row: dict) -> _Coll:
        s = json.loads(row["settings"])
        spec = validation.spec_from_json(s["kind"], json.dumps(s["params"]))
        return _Coll(s["name"], int(s["dim"]), s["fingerprint"], spec, float(s["created_at"]), float(s["updated_at"]))

    def _write_settings(self, coll: _Coll) -> None:
        settings = {"name": coll.name, "dim": coll.dim, "fingerprint": coll.fingerprint, "kind": coll.spec.kind,
                    "params": coll.spec.params(), "created_at": coll.created_at, "updated_at": coll.updated_at}
        self._call(f"saving collection {coll.name!r}'s settings", self.client.upsert, SETTINGS,
                   [{"key": coll.key, "settings": json.dumps(settings), "v": [1.0, 0.0]}])

    def _find(self, collection: str) -> _Coll | None:
        coll = self._colls.get(collection)
        if coll is None:  # perhaps created by another ranker on the same Milvus
            rows = self._call("reading collection settings", self.client.get, SETTINGS, ids=[milvus_name(collection)],
                              output_fields=["settings"])
            if rows:
                coll = self._from_row(rows[0])
                self._call(f"loading collection {collection!r}", self.client.load_collection, coll.key)
                self._colls[collection] = coll
        return coll

    def _get(self, collection: str) -> _Coll:
        coll = self._find(collection)
        if coll is None:
            raise validation.unknown_collection(collection, self._colls)
        return coll

    def _create(self, collection: str, dim: int, fingerprint: str, spec: IndexSpec) -> _Coll:
        from pymilvus import DataType, MilvusClient

        if not MIN_DIM <= dim <= MAX_DIM:
            raise errors.InvalidArgument(
                f"collection {collection!r}: dimension {dim} is outside Milvus's limits {MIN_DIM}..{MAX_DIM}")
        if spec.float16:
            raise errors.InvalidArgument("the Milvus backend keeps float32 vectors: float16 is not available")
        now = time.time()
        coll = _Coll(collection, dim, fingerprint, spec, now, now)
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("name", DataType.VARCHAR, is_primary=True, max_length=MAX_NAME_BYTES)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("created_at", DataType.DOUBLE)
        schema.add_field("updated_at", DataType.DOUBLE)
        schema.add_field("attributes", DataType.JSON)
        index_type, build, _ = _index_params(spec)
        index = self.client.prepare_index_params()
        index.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=build)
        try:
            self.client.create_collection(coll.key, schema=schema, index_params=index, consistency_level=CONSISTENCY)
            self.client.load_collection(coll.key)
        except Exception as exc:
            try:
                self.client.drop_collection(coll.key)
            except Exception as cleanup:  # noqa: BLE001 - best effort; the first error is the one to report
                log.warning("could not drop the half-made collection %s: %s", coll.key, cleanup)
            raise errors.FailedPrecondition(
                f"Milvus at {self.uri} cannot make a {spec.label} collection {collection!r}: {exc}") from exc
        self._write_settings(coll)
        self._colls[collection] = coll
        log.info("created Milvus collection %s for %r (dim %d, %s)", coll.key, collection, dim, index_type)
        return coll

    # ------------------------------------------------------------ writes

    def create_collection(self, collection: str, dim: int, fingerprint: str,
                          spec: IndexSpec) -> tuple[CollectionStats, bool]:
        self._require_ready()
        validation.check_new_collection(collection, dim, spec, MIN_DIM, MAX_DIM)
        with self._lock:
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
            coll = self._get(collection)
            count = self._count(coll)
            self._call(f"dropping {collection!r}", self.client.drop_collection, coll.key)
            self._call(f"dropping {collection!r}", self.client.delete, SETTINGS, ids=[coll.key])
            self._colls.pop(collection, None)
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
                "looking up names", self.client.get, coll.key, ids=list(items), output_fields=["name", "created_at"])}
            rows = [{"name": name, "vector": p.vector.tolist(), "created_at": existing.get(name, now),
                     "updated_at": now, "attributes": p.attributes} for name, p in items.items()]
            self._call(f"upserting {len(rows)} items", self.client.upsert, coll.key, rows)
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
        found = {r["name"] for r in self._call("looking up names", self.client.get, coll.key, ids=wanted,
                                               output_fields=["name"])} if wanted else set()
        existing = [n for n in wanted if n in found]
        if existing:
            self._call(f"deleting {len(existing)} names", self.client.delete, coll.key, ids=existing)
            coll.updated_at = time.time()
            self._write_settings(coll)
        return DeleteResult(len(existing), [n for n in wanted if n not in found])

    # ------------------------------------------------------------ reads

    def _prepare(self, query: Query, what: str) -> tuple[_Coll, np.ndarray, int]:
        k = validation.check_query(query, what)
        coll = self._get(query.collection)
        return coll, validation.query_vector(query, what, coll.name, coll.dim, coll.fingerprint), k

    def _search(self, coll: _Coll, q64: np.ndarray, k: int, query: Query | None = None) -> list[Match]:
        _, _, search_params = _index_params(coll.spec)
        exact = coll.spec.kind == EXACT
        fetch = min(MAX_SEARCH_LIMIT, max(2 * k, k + 64) if exact else coll.spec.candidates(k, MAX_SEARCH_LIMIT))
        q32 = q64.astype(np.float32).tolist()
        expr = filter_expression(query.filters) if query is not None and query.filters else ""
        fields = ["vector", "attributes"] if query is not None and query.with_attributes else ["vector"]
        if expr and not exact:
            passing = self._count(coll, expr)
            if passing <= FILTER_EXACT_SCAN_SHARE * self._count(coll):  # selective: scan the passing rows
                return self._rank(self._call("reading filtered rows", self.client.query, coll.key, filter=expr,
                                             output_fields=["name", *fields], consistency_level=CONSISTENCY),
                                  q64, k, query)
        while True:
            (hits,) = self._call("searching", self.client.search, coll.key, data=[q32], limit=fetch, filter=expr,
                                 output_fields=fields, consistency_level=CONSISTENCY,
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
            return self._rank(self._call("reading filtered rows", self.client.query, coll.key, filter=expr,
                                         output_fields=["name", *fields], consistency_level=CONSISTENCY),
                              q64, k, query)
        return self._rank([{"name": name, **h["entity"]} for name, h in zip(names, hits)], q64, k, query)

    @staticmethod
    def _rank(rows: list[dict], q64: np.ndarray, k: int, query: Query | None) -> list[Match]:
        """The exact float64 top-k of rows {name, vector[, attributes]}, ties by name."""
        if not rows:
            return []
        by_name = {r["name"]: r for r in rows}
        found = rank_exact(list(by_name), np.asarray([r["vector"] for r in by_name.values()], dtype=np.float32),
                           q64, k)
        with_attributes = query is not None and query.with_attributes
        return [Match(rank, name, score, dict(by_name[name].get("attributes") or {}) if with_attributes else {})
                for rank, (name, score) in enumerate(found, 1)]

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
                rows = self._call("reading vectors", self.client.get, coll.key, ids=[m.name for m in top],
                                  output_fields=["name", "vector"])
                by_name = {r["name"]: r["vector"] for r in rows}
                kept = [m for m in top if m.name in by_name]
                if kept:
                    q64 = expand_query(q64, np.asarray([by_name[m.name] for m in kept], dtype=np.float32),
                                       [m.score for m in kept], query.expansion.alpha)
        return self._search(coll, q64, k, query)

    def search(self, query: Query) -> list[Match]:
        self._require_ready()
        return self._answer(query, validation.describe_query(query))

    def derived_pending(self, query: Query) -> None:
        """No derived data here (k-reciprocal is refused): never waits."""
        return None

    def search_many(self, queries: Sequence[Query]) -> list[list[Match] | errors.ImageSearchError]:
        self._require_ready()
        results: list[list[Match] | errors.ImageSearchError] = []
        for i, query in enumerate(queries):
            try:
                results.append(self._answer(query, validation.describe_query(query, i)))
            except errors.ImageSearchError as exc:
                results.append(exc)
        return results

    def _count(self, coll: _Coll, expr: str = "") -> int:
        rows = self._call("counting", self.client.query, coll.key, filter=expr, output_fields=["count(*)"],
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
        iterator = self._call("listing names", self.client.query_iterator, coll.key, batch_size=1000,
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
            rows = {r["name"]: r for r in self._call("reading items", self.client.get, coll.key, ids=page,
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
                rows = self._call("reading an item", self.client.get, coll.key, ids=[old],
                                  output_fields=["name", "vector", "attributes", "created_at"])
                if not rows:
                    not_found.append(old)
                    continue
                done += 1
                if new == old:
                    continue
                row = rows[0]
                self._call("renaming", self.client.upsert, coll.key, [{
                    "name": new, "vector": list(row["vector"]), "created_at": row["created_at"],
                    "updated_at": time.time(), "attributes": row.get("attributes") or {}}])
                self._call("renaming", self.client.delete, coll.key, ids=[old])
            if done:
                coll.updated_at = time.time()
                self._write_settings(coll)
        return RenameResult(done, not_found)

    def _stats(self, coll: _Coll) -> CollectionStats:
        return CollectionStats(coll.name, self._count(coll), coll.dim, coll.fingerprint, 0, coll.created_at,
                               coll.updated_at, coll.spec)

    def stats(self, collection: str | None = None) -> list[CollectionStats]:
        self._require_ready()
        if collection:
            validation.check_collection(collection, what="stats")
            return [self._stats(self._get(collection))]
        return [self._stats(self._colls[name]) for name in sorted(self._colls)]

    def memory_bytes(self) -> int:
        return 0  # the vectors live in Milvus

    def backup(self):
        raise errors.FailedPrecondition(
            "Backup copies the SQLite backend's database; with --backend milvus the vectors live in Milvus: "
            "back them up with Milvus's own tools (e.g. milvus-backup)")


class MilvusUpsertJob(UpsertJob):
    """The Milvus backend's upsert job (backend.py): a flush is also due
    when an item names a collection that does not exist yet (it is created,
    with the first item's dimension and fingerprint, as the batch commits)."""

    def _prepare(self, index: int, item: UpsertItem) -> Pending:
        p = validation.pending_item(index, item)
        if len(p.name.encode("utf-8")) > MAX_NAME_BYTES:
            raise errors.InvalidArgument(f"{p.what}: the name takes more than {MAX_NAME_BYTES} bytes in UTF-8")
        return p

    def _due(self, p: Pending) -> bool:
        return self._backend._find(p.collection) is None

    def _commit(self, batch: list[Pending]) -> None:
        if batch:
            self._commit_batch(batch, self._backend._commit)

    def flush(self) -> None:
        backend, batch = self._backend, []
        pending, self._pending = self._pending, []
        for p in pending:
            with backend._lock:
                coll = backend._find(p.collection)
                if coll is None:
                    self._commit(batch)
                    batch = []
                    coll = backend._create(p.collection, p.vector.shape[0], p.fingerprint, IndexSpec())
            try:
                validation.check_fits(p.collection, coll.dim, coll.fingerprint, p)
            except errors.ImageSearchError as exc:
                self.fail(exc)
                break
            batch.append(p)
        self._commit(batch)
