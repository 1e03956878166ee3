"""`RankerService` over gRPC (grpc.aio): a thin servicer over a `RankerBackend`
(`SqliteBackend`: SQLite + in-memory indexes, or `MilvusBackend`).

The servicer converts protos to the core's plain types and back; the core
raises `imagesearch.errors`, which `imagesearch.serving`'s interceptor maps to
status codes. Every handler is a coroutine (an open call costs no thread);
searches and database writes run on the server's thread pool. Inside
`SearchStream` a failed query becomes that query's `error` answer and the
stream goes on. A collection name may be an alias: each call resolves it
here, once (`backend.aliases`), and passes the backend the collection it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc

from imagesearch import errors, serving
from imagesearch.defaults import DEFAULT_TOP_K, DERIVED_DEADLINE_MARGIN_S
from imagesearch.v1 import ranker_pb2, ranker_pb2_grpc
from ranker_service.backend import RankerBackend, deadline_of
from ranker_service.types import (
    EXACT,
    HNSW,
    IVF_PQ,
    Alias,
    AttributeFilter,
    CollectionStats,
    DerivedStatus,
    IndexSpec,
    Match,
    Query,
    StoredItem,
    Target,
    UpsertItem,
)
from ranker_service.validation import (
    DBA_REMOVED,
    check_filters,
    from_json,
    make_expansion,
    make_k_reciprocal,
    make_spec,
)

log = logging.getLogger(__name__)

SERVICE_NAME = ranker_pb2.DESCRIPTOR.services_by_name["RankerService"].full_name
DEFAULT_MAX_BATCH = 64
CHUNK_BYTES = 1 << 20  # Backup's chunks
# Upsert requests read ahead of the one being validated.
UPSERT_READ_AHEAD = 64
# Backups running at once.
DEFAULT_MAX_BACKUPS = 2
# Room for search answers computed and not yet written, across calls. A client
# that does not read holds its answer's room until it reads or the server's
# --stream-idle-timeout ends the call; searches past the room wait before they
# search. Answers over SMALL_ANSWER matches take at most a quarter of it: a
# small search always finds room, and a burst of large ones is searched and
# written a few dozen at a time, not all at once (bench/results/abuse.md).
ANSWER_ROOM_BYTES = 32 << 20
MATCH_BYTES = 256  # one match of an answer, as Python objects and protobuf
SMALL_ANSWER = 100


def _match(m: Match) -> ranker_pb2.Match:
    return ranker_pb2.Match(rank=m.rank, name=m.name, score=m.score, attributes=m.attributes)


def _filters(filters, what: str) -> tuple[AttributeFilter, ...]:
    return check_filters(((f.key, f.values) for f in filters), what=what)


def _optional(message, field: str):
    return getattr(message, field) if message.HasField(field) else None


def _deadline(context) -> float | None:
    """The call's deadline on time.monotonic()'s clock, a little early (so an
    answer given at it still reaches the client); None when it has none."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + remaining - min(DERIVED_DEADLINE_MARGIN_S, remaining / 10)


def _query(r, what: str, id: str = "", deadline: float | None = None, collection: str = "") -> Query:
    expansion = k_reciprocal = None
    if r.HasField("query_expansion"):
        qe = r.query_expansion
        expansion = make_expansion(qe.top_n, _optional(qe, "alpha"), what=f"{what}: query_expansion")
    if r.HasField("k_reciprocal"):
        kr = r.k_reciprocal
        k_reciprocal = make_k_reciprocal(kr.k1, kr.k2, _optional(kr, "lambda"), kr.shortlist,
                                         what=f"{what}: k_reciprocal")
    return Query(collection or r.collection, r.vector, r.top_k, r.fingerprint, id, _filters(r.filters, what),
                 r.with_attributes, expansion, k_reciprocal, deadline)


def _item(item: StoredItem) -> ranker_pb2.Item:
    out = ranker_pb2.Item(name=item.name, attributes=from_json(item.attributes), created_at=item.created_at,
                          updated_at=item.updated_at, fingerprint=item.fingerprint)
    if item.vector is not None:
        out.vector.extend(item.vector)
    return out


_KIND_TO_PROTO = {EXACT: ranker_pb2.INDEX_KIND_EXACT, HNSW: ranker_pb2.INDEX_KIND_HNSW,
                  IVF_PQ: ranker_pb2.INDEX_KIND_IVF_PQ}
_KIND_FROM_PROTO = {v: k for k, v in _KIND_TO_PROTO.items()} | {ranker_pb2.INDEX_KIND_UNSPECIFIED: EXACT}


def index_spec(options: ranker_pb2.IndexOptions) -> IndexSpec:
    kind = _KIND_FROM_PROTO.get(options.kind)
    if kind is None:
        raise errors.InvalidArgument(f"unknown index kind {options.kind}")
    params = {"float16": options.float16, "hnsw_m": options.hnsw_m, "ef_construction": options.ef_construction,
              "ef_search": options.ef_search, "nlist": options.nlist, "nprobe": options.nprobe,
              "pq_bytes": options.pq_bytes, "rerank_factor": options.rerank_factor}
    if kind != EXACT:
        params["rerank"] = not options.no_rerank
    if options.HasField("dba"):
        raise errors.InvalidArgument(DBA_REMOVED)
    return make_spec(kind, **params)


def index_options(spec: IndexSpec) -> ranker_pb2.IndexOptions:
    params = spec.params()
    rerank = params.pop("rerank", True)
    return ranker_pb2.IndexOptions(kind=_KIND_TO_PROTO[spec.kind], no_rerank=not rerank, **params)


_DERIVED_STATES = {"none": ranker_pb2.DERIVED_STATE_UNSPECIFIED, "current": ranker_pb2.DERIVED_STATE_CURRENT,
                   "stale": ranker_pb2.DERIVED_STATE_STALE, "rebuilding": ranker_pb2.DERIVED_STATE_REBUILDING}


def derived_data(d: DerivedStatus | None) -> ranker_pb2.DerivedData | None:
    if d is None:
        return None
    return ranker_pb2.DerivedData(state=_DERIVED_STATES[d.state], generation=max(0, d.generation),
                                  built_generation=max(0, d.built_generation), building_since=d.building_since,
                                  last_build_seconds=d.last_build_seconds, kinds=d.kinds)


def collection_stats(s: CollectionStats) -> ranker_pb2.CollectionStats:
    return ranker_pb2.CollectionStats(
        name=s.name, count=s.count, dim=s.dim, fingerprint=s.fingerprint, memory_bytes=s.memory_bytes,
        created_at=s.created_at, updated_at=s.updated_at, index=index_options(s.spec),
        derived_data=derived_data(s.derived))


def _alias(a: Alias) -> ranker_pb2.Alias:
    return ranker_pb2.Alias(name=a.name, collection=a.collection, previous_collection=a.previous)


def _on_target(gallery: RankerBackend, op, name: str, *args):
    """`op(the collection name resolves to, *args)`: an alias resolved once, in the same pool job."""
    return op(gallery.aliases.resolve(name).collection, *args)


def _search_now(gallery: RankerBackend, query: Query) -> tuple[Target, Query, list[Match] | None, Future | None]:
    """The query's collection resolved, and its matches; instead of them, when
    the derived re-ranking data it needs is being rebuilt, the future to await
    on the event loop before searching. One pool job for the usual search."""
    target = gallery.aliases.resolve(query.collection)
    query = dataclasses.replace(query, collection=target.collection)
    wait = gallery.derived_pending(query)
    return target, query, gallery.search(query) if wait is None else None, wait


async def _blocking(fn, *args, deadline: float | None = None):
    """`fn(*args)` on the server's thread pool, within the call's `deadline` (backend.deadline_of)."""
    def run():
        with deadline_of(deadline):
            return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, run)


def _lower_priority() -> None:
    """Run the calling thread at the lowest CPU priority (Linux: a thread's own
    nice value), so that a backup's copying and hashing yield to searches."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def read_chunks(path: Path, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


async def _derived_ready(gallery: RankerBackend, queries: list[Query]) -> None:
    """Wait, on the event loop (no pool thread held), until the derived
    re-ranking data the queries need is current (a rebuild after a write runs
    in the background: rerank/cache.py), within the first query's deadline (the
    call's); DeadlineExceeded past it. The search itself then waits no more
    (unless another write came meanwhile)."""
    waits = [w for q in queries if (w := gallery.derived_pending(q)) is not None]
    await _awaited(waits, queries[0].deadline if waits else None)


async def _awaited(waits: list[Future], deadline: float | None) -> None:
    """Every future done, or DeadlineExceeded past `deadline`."""
    if not waits:
        return
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(w) for w in waits)), timeout)
    except TimeoutError:
        raise next((w for w in waits if not w.done() or w.cancelled()), waits[0]).expired() from None


class RankerServicer(ranker_pb2_grpc.RankerServiceServicer):
    def __init__(self, *, max_batch: int = DEFAULT_MAX_BATCH, max_backups: int = DEFAULT_MAX_BACKUPS,
                 answer_room_bytes: int = ANSWER_ROOM_BYTES):
        if max_batch < 1 or max_backups < 1:
            raise ValueError("max_batch and max_backups must be at least 1")
        self.ready: serving.Readiness[RankerBackend] = serving.Readiness(
            "the ranker is still loading its database (health NOT_SERVING): retry shortly")
        self.max_batch = max_batch
        self.max_backups = max_backups
        self._backups = 0  # running now (changed on the event loop only)
        # Backups copy, check and hash on threads of their own at the lowest CPU
        # priority: a burst of them never takes the pool that searches run on.
        self._backup_pool = ThreadPoolExecutor(max_backups, thread_name_prefix="backup", initializer=_lower_priority)
        self.answers = serving.ByteBudget(answer_room_bytes)

    def attach(self, gallery: RankerBackend) -> None:
        self.ready.attach(gallery)

    async def _resolve(self, gallery: RankerBackend, names, targets: dict[str, Target], context) -> None:
        """Resolve the names not in `targets` yet (once per call: an alias switched
        meanwhile does not change where the rest of the call goes)."""
        new = [n for n in dict.fromkeys(names) if n not in targets]
        if new:
            targets.update(zip(new, await _blocking(lambda: [gallery.aliases.resolve(n) for n in new],
                                                    deadline=_deadline(context))))

    async def Upsert(self, requests, context):
        gallery = self.ready.core()
        job, targets = gallery.upsert_job(), {}
        async with serving.StreamReader(requests, ahead=UPSERT_READ_AHEAD) as reader:
            while (r := await reader.next()) is not None:
                await self._resolve(gallery, [r.collection], targets, context)
                if job.add(UpsertItem(targets[r.collection].collection, r.name, r.vector, r.fingerprint,
                                      r.attributes)):
                    if job.failed:
                        break
                    await _blocking(job.flush, deadline=_deadline(context))
            if reader.broken:
                return None  # cancelled: nobody will read an answer; what was flushed stays committed
            if reader.failure is not None:
                job.fail(reader.failure)
        result = await _blocking(job.finish, deadline=_deadline(context))
        return ranker_pb2.UpsertResponse(upserted=result.upserted, inserted=result.inserted,
                                         replaced=result.replaced)

    async def Delete(self, request, context):
        gallery = self.ready.core()
        result = await _blocking(_on_target, gallery, gallery.delete, request.collection, list(request.names),
                                 deadline=_deadline(context))
        return ranker_pb2.DeleteResponse(deleted=result.deleted, not_found=result.not_found)

    @contextlib.asynccontextmanager
    async def _answer_room(self, matches: int):
        """Room for an answer of `matches` matches until it is written."""
        big = matches > SMALL_ANSWER
        held = await self.answers.acquire(matches * MATCH_BYTES, rank=int(big),
                                          limit=self.answers.capacity // 4 if big else None)
        try:
            yield
        finally:
            self.answers.release(held)

    async def Search(self, request, context):
        gallery = self.ready.core()
        query = _query(request, "query", deadline=_deadline(context))
        async with self._answer_room(query.top_k or DEFAULT_TOP_K):
            target, query, matches, wait = await _blocking(_search_now, gallery, query, deadline=query.deadline)
            if matches is None:  # the rebuild `wait` stands for is started: await it, no second request
                await _awaited([wait], query.deadline)
                matches = await _blocking(gallery.search, query)
            origin = {"collection": target.collection, "fingerprint": target.fingerprint}
            page = request.page_size
            if page:
                for start in range(0, len(matches), page):
                    await context.write(ranker_pb2.SearchResponse(
                        matches=[_match(m) for m in matches[start:start + page]], **origin))
            else:
                for m in matches:
                    await context.write(ranker_pb2.SearchResponse(match=_match(m), **origin))

    async def SearchStream(self, requests, context):
        gallery = self.ready.core()
        deadline = _deadline(context)
        targets: dict[str, Target] = {}  # each name resolved once, at its first query
        async with serving.StreamReader(requests, ahead=4 * self.max_batch) as reader:
            while batch := await reader.batch(self.max_batch):
                await self._resolve(gallery, [r.collection for r in batch], targets, context)
                queries, bad = [], {}
                for i, r in enumerate(batch):
                    try:
                        queries.append(_query(r, f"query {r.id!r}", r.id, deadline,
                                              targets[r.collection].collection))
                    except errors.ImageSearchError as exc:  # bad filters: this query's error answer
                        bad[i] = exc
                        queries.append(Query(r.collection, (), id=r.id))
                good = [q for i, q in enumerate(queries) if i not in bad]
                log.debug("SearchStream: %d queries in one batch", len(queries))
                async with self._answer_room(sum(q.top_k or DEFAULT_TOP_K for q in good)):
                    try:
                        await _derived_ready(gallery, good)
                        answers = iter(await _blocking(gallery.search_many, good))
                    except errors.ImageSearchError as exc:  # e.g. shutting down: every query of the batch gets it
                        answers = iter([exc] * len(good))
                    results = [bad[i] if i in bad else next(answers) for i in range(len(queries))]
                    for r, query, result in zip(batch, queries, results):
                        if isinstance(result, Exception):
                            answer = ranker_pb2.SearchStreamResponse(
                                id=query.id, error=serving.item_error(result, "SearchStream", f"query {query.id!r}"))
                        else:
                            target = targets[r.collection]
                            answer = ranker_pb2.SearchStreamResponse(
                                id=query.id, matches=[_match(m) for m in result], collection=target.collection,
                                fingerprint=target.fingerprint)
                        await context.write(answer)
        reader.raise_failure()

    async def GetStats(self, request, context):
        gallery = self.ready.core()
        if request.collection:  # an alias: its collection's
            stats = await _blocking(_on_target, gallery, gallery.stats, request.collection,
                                    deadline=_deadline(context))
        else:
            stats = await _blocking(gallery.stats, None, deadline=_deadline(context))
        return ranker_pb2.GetStatsResponse(
            collections=[collection_stats(s) for s in stats],
            memory_bytes=sum(s.memory_bytes for s in stats),
            max_top_k=gallery.max_top_k)

    async def ListItems(self, request, context):
        gallery, filters = self.ready.core(), _filters(request.filters, "list items")
        pages = await _blocking(_on_target, gallery, lambda collection: gallery.list_items(
            collection, page_size=request.page_size, start_after=request.start_after, limit=request.limit,
            filters=filters, with_vectors=request.with_vectors), request.collection, deadline=_deadline(context))
        while (page := await _blocking(next, pages, None, deadline=_deadline(context))) is not None:  # each page is a database read
            await context.write(ranker_pb2.ListItemsResponse(items=[_item(i) for i in page.items]))

    async def Rename(self, request, context):
        gallery = self.ready.core()
        result = await _blocking(_on_target, gallery, gallery.rename, request.collection,
                                 [(r.from_name, r.to_name) for r in request.renamings], request.in_order,
                                 deadline=_deadline(context))
        return ranker_pb2.RenameResponse(renamed=result.renamed, not_found=result.not_found)

    async def CreateCollection(self, request, context):
        stats, created = await _blocking(self.ready.core().create_collection, request.collection, request.dim,
                                         request.fingerprint, index_spec(request.index), deadline=_deadline(context))
        return ranker_pb2.CreateCollectionResponse(collection=collection_stats(stats), created=created)

    async def DropCollection(self, request, context):
        deleted = await _blocking(self.ready.core().drop_collection, request.collection, deadline=_deadline(context))
        return ranker_pb2.DropCollectionResponse(deleted=deleted)

    async def CreateAlias(self, request, context):
        alias = await _blocking(self.ready.core().aliases.create, request.alias, request.collection,
                                deadline=_deadline(context))
        return ranker_pb2.CreateAliasResponse(alias=_alias(alias))

    async def SwitchAlias(self, request, context):
        alias = await _blocking(self.ready.core().aliases.switch, request.alias, request.collection,
                                request.expected_collection, deadline=_deadline(context))
        return ranker_pb2.SwitchAliasResponse(alias=_alias(alias))

    async def DropAlias(self, request, context):
        await _blocking(self.ready.core().aliases.drop, request.alias, deadline=_deadline(context))
        return ranker_pb2.DropAliasResponse()

    async def ListAliases(self, request, context):
        aliases = await _blocking(self.ready.core().aliases.list, deadline=_deadline(context))
        return ranker_pb2.ListAliasesResponse(aliases=[_alias(a) for a in aliases])

    async def Backup(self, request, context):
        core = self.ready.core()
        if self._backups >= self.max_backups:
            raise errors.ResourceExhausted(
                f"{self._backups} backups are running, the most this ranker runs at once (--max-backups "
                f"{self.max_backups}): try again when one has ended")
        self._backups += 1
        try:
            await self._backup(core.backup(), context)
        finally:
            self._backups -= 1

    async def _backup(self, backup, context) -> None:
        loop = asyncio.get_running_loop()
        copy = await loop.run_in_executor(self._backup_pool, backup.__enter__)
        try:
            chunks = read_chunks(copy.path)
            first = True
            while (chunk := await loop.run_in_executor(self._backup_pool, next, chunks, None)) is not None:
                head = dict(total_bytes=copy.size, sha256=copy.sha256, collections=copy.collections,
                            vectors=copy.vectors) if first else {}
                first = False
                # A reader that stops reading blocks this write; the server's
                # --stream-idle-timeout then ends the call, and the copy goes.
                await context.write(ranker_pb2.BackupResponse(chunk=chunk, **head))
        finally:
            await loop.run_in_executor(self._backup_pool, backup.__exit__, None, None, None)


def register(servicer: RankerServicer):
    """A `register(server)` callback for `imagesearch.serving.build_server`."""

    def add(server: grpc.aio.Server) -> None:
        ranker_pb2_grpc.add_RankerServiceServicer_to_server(servicer, server)

    return add
