"""`RankerService` over gRPC: a thin servicer over a `RankerBackend`
(`Gallery`: SQLite + in-memory indexes, or `MilvusGallery`).

The servicer converts protos to the core's plain types and back; the core
raises `imagesearch.errors`, which `imagesearch.serving`'s interceptor maps to
status codes. Inside `SearchStream` a failed query becomes that query's
`error` answer and the stream goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Iterable, Iterator, TypeVar

import grpc

from imagesearch import errors, serving
from imagesearch.v1 import common_pb2, ranker_pb2, ranker_pb2_grpc
from ranker_service import kinds
from ranker_service.backup import read_chunks
from ranker_service.backend import RankerBackend
from ranker_service.gallery import UpsertItem
from ranker_service.index import CollectionStats, Match, Query
from ranker_service.attributes import AttributeFilter, check_filters, from_json
from ranker_service.store import StoredItem

log = logging.getLogger(__name__)

SERVICE_NAME = ranker_pb2.DESCRIPTOR.services_by_name["RankerService"].full_name
DEFAULT_MAX_BATCH = 64

T = TypeVar("T")


def gather_batches(requests: Iterable[T], max_batch: int) -> Iterator[list[T]]:
    """Batches of what has arrived: block for one request, then take every
    request already waiting, up to `max_batch`. A reader thread pulls from the
    stream into a bounded queue (so a fast client meets gRPC flow control, not
    unbounded memory). An error from the stream (a cancelled call) ends the
    batches after those already read; closing the generator stops the reader."""
    box: queue.Queue = queue.Queue(maxsize=max(1, 4 * max_batch))
    end = object()
    closed = threading.Event()

    def put(item) -> bool:
        while not closed.is_set():
            try:
                box.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for request in requests:
                if not put(request):
                    return
        except grpc.RpcError:
            log.debug("request stream ended by the client")
        except Exception:  # pragma: no cover - logged, the stream just ends
            log.exception("reading the request stream failed")
        finally:
            put(end)

    reader = threading.Thread(target=pump, name="search-stream-reader", daemon=True)
    reader.start()
    try:
        while True:
            first = box.get()
            if first is end:
                return
            batch = [first]
            finished = False
            while len(batch) < max_batch:
                try:
                    nxt = box.get_nowait()
                except queue.Empty:
                    break
                if nxt is end:
                    finished = True
                    break
                batch.append(nxt)
            yield batch
            if finished:
                return
    finally:
        closed.set()


def _match(m: Match) -> ranker_pb2.Match:
    return ranker_pb2.Match(rank=m.rank, name=m.name, score=m.score, attributes=m.attributes)


def _filters(filters, what: str) -> tuple[AttributeFilter, ...]:
    return check_filters(((f.key, f.values) for f in filters), what=what)


def _query(r, what: str, id: str = "") -> Query:
    return Query(r.collection, r.vector, r.top_k, r.fingerprint, id, _filters(r.filters, what), r.with_attributes)


def _item(item: StoredItem) -> ranker_pb2.Item:
    out = ranker_pb2.Item(name=item.name, attributes=from_json(item.attributes), created_at=item.created_at,
                          updated_at=item.updated_at, fingerprint=item.fingerprint)
    if item.vector is not None:
        out.vector.extend(item.vector)
    return out


_KIND_TO_PROTO = {kinds.EXACT: ranker_pb2.INDEX_KIND_EXACT, kinds.HNSW: ranker_pb2.INDEX_KIND_HNSW,
                  kinds.IVF_PQ: ranker_pb2.INDEX_KIND_IVF_PQ}
_KIND_FROM_PROTO = {v: k for k, v in _KIND_TO_PROTO.items()} | {ranker_pb2.INDEX_KIND_UNSPECIFIED: kinds.EXACT}


def index_spec(options: ranker_pb2.IndexOptions) -> kinds.IndexSpec:
    kind = _KIND_FROM_PROTO.get(options.kind)
    if kind is None:
        raise errors.InvalidArgument(f"unknown index kind {options.kind}")
    params = {"float16": options.float16, "hnsw_m": options.hnsw_m, "ef_construction": options.ef_construction,
              "ef_search": options.ef_search, "nlist": options.nlist, "nprobe": options.nprobe,
              "pq_bytes": options.pq_bytes, "rerank_factor": options.rerank_factor}
    if kind != kinds.EXACT:
        params["rerank"] = not options.no_rerank
    return kinds.make_spec(kind, **params)


def index_options(spec: kinds.IndexSpec) -> ranker_pb2.IndexOptions:
    params = spec.params()
    rerank = params.pop("rerank", True)
    return ranker_pb2.IndexOptions(kind=_KIND_TO_PROTO[spec.kind], no_rerank=not rerank, **params)


def collection_stats(s: CollectionStats) -> ranker_pb2.CollectionStats:
    return ranker_pb2.CollectionStats(
        name=s.name, count=s.count, dim=s.dim, fingerprint=s.fingerprint, memory_bytes=s.memory_bytes,
        created_at=s.created_at, updated_at=s.updated_at, index=index_options(s.spec))


class RankerServicer(ranker_pb2_grpc.RankerServiceServicer):
    def __init__(self, gallery: RankerBackend, *, max_batch: int = DEFAULT_MAX_BATCH):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.gallery = gallery
        self.max_batch = max_batch

    def Upsert(self, request_iterator, context):
        result = self.gallery.upsert(
            UpsertItem(r.collection, r.name, r.vector, r.fingerprint, r.attributes) for r in request_iterator)
        return ranker_pb2.UpsertResponse(upserted=result.upserted, inserted=result.inserted,
                                         replaced=result.replaced)

    def Delete(self, request, context):
        result = self.gallery.delete(request.collection, list(request.names))
        return ranker_pb2.DeleteResponse(deleted=result.deleted, not_found=result.not_found)

    def Search(self, request, context):
        matches = self.gallery.search(_query(request, "query"))
        for m in matches:
            yield ranker_pb2.SearchResponse(match=_match(m))

    def SearchStream(self, request_iterator, context):
        for batch in gather_batches(request_iterator, self.max_batch):
            queries, bad = [], {}
            for i, r in enumerate(batch):
                try:
                    queries.append(_query(r, f"query {r.id!r}", r.id))
                except errors.ImageSearchError as exc:  # bad filters: this query's error answer
                    bad[i] = exc
                    queries.append(Query(r.collection, (), id=r.id))
            good = [q for i, q in enumerate(queries) if i not in bad]
            log.debug("SearchStream: %d queries in one batch", len(queries))
            try:
                answers = iter(self.gallery.search_many(good))
            except errors.ImageSearchError as exc:  # e.g. still loading: every query of the batch gets it
                answers = iter([exc] * len(good))
            results = [bad[i] if i in bad else next(answers) for i in range(len(queries))]
            for query, result in zip(queries, results):
                if isinstance(result, errors.ImageSearchError):
                    code, message = serving.item_error_fields(result)
                    yield ranker_pb2.SearchStreamResponse(
                        id=query.id, error=common_pb2.ItemError(code=code, message=message))
                else:
                    yield ranker_pb2.SearchStreamResponse(id=query.id, matches=[_match(m) for m in result])

    def GetStats(self, request, context):
        stats = self.gallery.stats(request.collection or None)
        return ranker_pb2.GetStatsResponse(
            collections=[collection_stats(s) for s in stats],
            memory_bytes=sum(s.memory_bytes for s in stats),
            max_top_k=self.gallery.max_top_k)

    def ListItems(self, request, context):
        pages = self.gallery.list_items(
            request.collection, page_size=request.page_size, start_after=request.start_after, limit=request.limit,
            filters=_filters(request.filters, "list items"), with_vectors=request.with_vectors)
        for page in pages:
            yield ranker_pb2.ListItemsResponse(items=[_item(i) for i in page.items])

    def Rename(self, request, context):
        result = self.gallery.rename(request.collection, [(r.from_name, r.to_name) for r in request.renamings])
        return ranker_pb2.RenameResponse(renamed=result.renamed, not_found=result.not_found)

    def CreateCollection(self, request, context):
        stats, created = self.gallery.create_collection(request.collection, request.dim, request.fingerprint,
                                                        index_spec(request.index))
        return ranker_pb2.CreateCollectionResponse(collection=collection_stats(stats), created=created)

    def DropCollection(self, request, context):
        return ranker_pb2.DropCollectionResponse(deleted=self.gallery.drop_collection(request.collection))

    def Backup(self, request, context):
        with self.gallery.backup() as copy:
            for i, chunk in enumerate(read_chunks(copy.path)):
                head = dict(total_bytes=copy.size, sha256=copy.sha256, collections=copy.collections,
                            vectors=copy.vectors) if i == 0 else {}
                yield ranker_pb2.BackupResponse(chunk=chunk, **head)


def register(gallery: RankerBackend, *, max_batch: int = DEFAULT_MAX_BATCH):
    """A `register(server)` callback for `imagesearch.serving.build_server`."""
    servicer = RankerServicer(gallery, max_batch=max_batch)

    def add(server: grpc.Server) -> None:
        ranker_pb2_grpc.add_RankerServiceServicer_to_server(servicer, server)

    return add
