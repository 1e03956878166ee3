"""`RankerClient`: the RankerService through its generated stub, with a
deadline on every call and gRPC's retry on UNAVAILABLE."""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import grpc

from clients import wire
from clients.base import ServiceClient
from clients.errors import SERVE_HINT, ClientError, UsageError
from clients.types import (
    AliasInfo,
    BackupResult,
    CollectionStats,
    DeleteResult,
    Embedding,
    Failure,
    KReciprocal,
    Matches,
    QueryExpansion,
    RenameResult,
    SearchResult,
    Stats,
    StoredItem,
    UpsertResult,
)
from imagesearch import defaults
from imagesearch.files import atomic_write
from imagesearch.v1 import ranker_pb2, ranker_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = ranker_pb2.DESCRIPTOR.services_by_name["RankerService"].full_name
DEFAULT_ADDRESS = defaults.RANKER_ADDRESS
ADDRESS_ENV = defaults.RANKER_ENV
HINT = SERVE_HINT.format(flag="--ranker", env=ADDRESS_ENV)
REINDEX = "imagesearch reindex GALLERY_DIR --alias ALIAS --model NAME (docs/operations.md#roll-out-a-new-model)"
# A backup streams the whole database: far longer than one call.
BACKUP_TIMEOUT_S = 3600.0


# An item to store or a query: an Embedding (its own name, vector and
# fingerprint), or a (name, vector) pair that takes the call's fingerprint.
Item = Union[Embedding, tuple[str, Any]]


# Attribute filters: {key: value} for equality, {key: [values]} for IN; all must pass.
Filters = Mapping[str, Union[str, Sequence[str]]]
# Attributes to store: one map for every item, or a function of the item's name.
AttributesFor = Union[Mapping[str, str], Callable[[str], Mapping[str, str]], None]


def _item(item: Item, fingerprint: str) -> tuple[str, Any, str]:
    if isinstance(item, Embedding):
        return item.name, item.vector, item.fingerprint or fingerprint
    name, vector = item
    return name, vector, fingerprint


class RankerClient(ServiceClient):
    what = "ranker"
    hint = HINT
    service = SERVICE
    stub_class = ranker_pb2_grpc.RankerServiceStub
    default_address = DEFAULT_ADDRESS

    def __init__(self, address: str | None = None, **kwargs):
        if address and "," in address and not address.startswith(("ipv4:", "ipv6:", "dns:")):
            raise UsageError(f"--ranker takes one address, not a list ({address!r}): "
                             "the ranker holds the gallery, so all clients must talk to the same one")
        super().__init__(address, **kwargs)

    # ------------------------------------------------------------------ calls

    def stats(self, collection: str = "") -> Stats:
        try:
            return wire.stats(self.stub.GetStats(ranker_pb2.GetStatsRequest(collection=collection),
                                                 timeout=self.timeout))
        except grpc.RpcError as exc:
            hint = ""
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                hint = f"index a gallery into it first: imagesearch index GALLERY_DIR --collection {collection}"
            raise self._error(exc, hint) from None

    def collection(self, name: str) -> CollectionStats | None:
        """The stats of a collection, or of an alias's target (its own name in
        `.name`); None when neither exists."""
        try:
            found = self.stats(name).collections
        except ClientError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
            return None
        return found[0] if found else None

    def upsert(self, collection: str, items: Iterable[Item], *, fingerprint: str = "",
               attributes: AttributesFor = None, timeout: float | None = None) -> UpsertResult:
        """One Upsert call storing `items` (which may be a generator fed by an
        embedding stream: each is sent as it comes), each with `attributes`
        (a map, or a function of the item's name). Returns what the server
        committed. The deadline is `timeout`, or the call timeout plus the
        per-item allowance for `len(items)` items when that is known."""
        def requests():
            for item in items:
                name, vector, fp = _item(item, fingerprint)
                attrs = attributes(name) if callable(attributes) else attributes
                yield wire.set_vector(ranker_pb2.UpsertRequest(collection=collection, name=name, fingerprint=fp,
                                                               attributes=attrs or {}), vector)

        try:
            return wire.upsert_result(self.stub.Upsert(requests(), timeout=timeout or self._deadline(items)))
        except grpc.RpcError as exc:
            hint = ""
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                hint = ("the collection holds vectors of another model: serve that model, or move the gallery "
                        f"to this one without downtime: {REINDEX}")
            raise self._error(exc, hint) from None

    def backup(self, path, *, timeout: float = BACKUP_TIMEOUT_S) -> BackupResult:
        """Write a consistent copy of the ranker's database to `path` (atomically:
        a temporary file beside it, checked against the server's size and sha256,
        then renamed). The copy is a SQLite file another ranker can open."""
        head: list[ranker_pb2.BackupResponse] = []
        digest = hashlib.sha256()

        def write(f) -> None:
            for reply in self.stub.Backup(ranker_pb2.BackupRequest(), timeout=timeout):
                if not head:
                    head.append(reply)
                digest.update(reply.chunk)
                f.write(reply.chunk)
            if not head:
                raise ClientError("the ranker sent an empty backup")
            size = f.tell()
            if size != head[0].total_bytes or digest.hexdigest() != head[0].sha256:
                raise ClientError(f"the backup arrived damaged ({size} of {head[0].total_bytes} bytes, sha256 "
                                  f"{digest.hexdigest()[:12]} vs {head[0].sha256[:12]}): nothing written")

        try:
            atomic_write(path, write)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        except OSError as exc:
            raise ClientError(f"cannot write the backup to {path}: {exc.strerror or exc}") from None
        first = head[0]
        return BackupResult(str(path), first.total_bytes, first.sha256, first.collections, first.vectors)

    def create_collection(self, collection: str, dim: int, fingerprint: str = "", *,
                          kind: str = "exact") -> tuple[CollectionStats, bool]:
        """CreateCollection: an empty collection of an index kind (exact, exact16,
        hnsw, ivf_pq). Returns (its stats, created); an identical collection is no error
        (created False), one with other options is (ALREADY_EXISTS)."""
        request = ranker_pb2.CreateCollectionRequest(collection=collection, dim=dim, fingerprint=fingerprint,
                                                     index=wire.index_options(kind))
        try:
            reply = self.stub.CreateCollection(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            hint = ""
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                hint = "use another --collection, or drop this one first"
            raise self._error(exc, hint) from None
        return wire.collection_stats(reply.collection), reply.created

    def drop_collection(self, collection: str) -> int:
        """DropCollection: the collection and its items; returns how many it held."""
        try:
            return self.stub.DropCollection(ranker_pb2.DropCollectionRequest(collection=collection),
                                            timeout=self.timeout).deleted
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def delete(self, collection: str, names: Sequence[str]) -> DeleteResult:
        try:
            return wire.delete_result(self.stub.Delete(ranker_pb2.DeleteRequest(collection=collection,
                                                                                names=list(names)),
                                                       timeout=self.timeout))
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def search(self, collection: str, vector, *, top_k: int = 10, fingerprint: str = "",
               filters: Filters | None = None, with_attributes: bool = False,
               query_expansion: QueryExpansion | None = None, k_reciprocal: KReciprocal | None = None,
               timeout: float | None = None) -> Matches:
        """One query -> its ranked matches, best first (only items passing
        `filters`, applied before top_k), re-ranked when asked
        (docs/ranker.md#re-ranking); `.collection` and `.fingerprint` say which
        collection answered (`collection` may be an alias)."""
        request = wire.set_vector(ranker_pb2.SearchRequest(
            collection=collection, top_k=top_k, fingerprint=fingerprint, filters=wire.filters(filters),
            with_attributes=with_attributes, **wire.rerank_fields(query_expansion, k_reciprocal)), vector)
        try:
            replies = list(self.stub.Search(request, timeout=timeout or self.timeout))
        except grpc.RpcError as exc:
            raise self._error(exc, self._search_hint(exc, collection)) from None
        head = replies[0] if replies else ranker_pb2.SearchResponse()
        return Matches([wire.match(r.match) for r in replies], head.collection, head.fingerprint)

    @staticmethod
    def _search_hint(exc: grpc.RpcError, collection: str) -> str:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return f"index a gallery first: imagesearch index GALLERY_DIR --collection {collection}"
        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
            return ("the gallery was indexed with another model: query with that one, or move the gallery to "
                    f"yours: {REINDEX}")
        return ""

    def search_stream(self, collection: str, queries: Iterable[Item], *, top_k: int = 10, fingerprint: str = "",
                      filters: Filters | None = None, with_attributes: bool = False,
                      query_expansion: QueryExpansion | None = None, k_reciprocal: KReciprocal | None = None,
                      timeout: float | None = None) -> Iterator[SearchResult | Failure]:
        """SearchStream: every query (named; sent as it comes) answered by a
        SearchResult or a Failure under its name, as answers arrive (each
        re-ranked when asked, independently of the others)."""
        proto_filters = wire.filters(filters)
        rerank = wire.rerank_fields(query_expansion, k_reciprocal)

        def requests():
            for query in queries:
                name, vector, fp = _item(query, fingerprint)
                yield wire.set_vector(ranker_pb2.SearchStreamRequest(
                    id=name, collection=collection, top_k=top_k, fingerprint=fp, filters=proto_filters,
                    with_attributes=with_attributes, **rerank), vector)

        call = self.stub.SearchStream(requests(), timeout=timeout or self._deadline(queries))
        try:
            for reply in call:
                if reply.HasField("error") and reply.error.code:
                    yield wire.failure(reply.id, reply.error)
                else:
                    yield SearchResult(reply.id, [wire.match(m) for m in reply.matches], reply.collection,
                                       reply.fingerprint)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        finally:
            call.cancel()

    def list_items(self, collection: str, *, filters: Filters | None = None, with_vectors: bool = False,
                   start_after: str = "", limit: int = 0, page_size: int = 0,
                   timeout: float | None = None) -> Iterator[StoredItem]:
        """ListItems: the collection's items in name order (those passing
        `filters`), with their stored vectors when asked for."""
        request = ranker_pb2.ListItemsRequest(collection=collection, filters=wire.filters(filters),
                                              with_vectors=with_vectors, start_after=start_after, limit=limit,
                                              page_size=page_size)
        call = self.stub.ListItems(request, timeout=timeout or self.timeout)
        try:
            for page in call:
                for item in page.items:
                    yield wire.stored_item(item)
        except grpc.RpcError as exc:
            raise self._error(exc, self._search_hint(exc, collection)) from None
        finally:
            call.cancel()

    def rename(self, collection: str, renamings: Sequence[tuple[str, str]], *, in_order: bool = False) -> RenameResult:
        """New names for items, keeping their vectors and attributes (an existing target is replaced).
        Renamings that share a name are refused unless `in_order` applies them one after another, like `mv`."""
        request = ranker_pb2.RenameRequest(collection=collection, in_order=in_order, renamings=[
            ranker_pb2.Renaming(from_name=old, to_name=new) for old, new in renamings])
        try:
            return wire.rename_result(self.stub.Rename(request, timeout=self.stream_deadline(len(renamings))))
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    # ------------------------------------------------------------------ aliases

    def _aliases(self, method: str, request):
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            hint = ""
            if exc.code() == grpc.StatusCode.ABORTED:
                hint = "another switch came first: read the alias again (list_aliases) and decide"
            raise self._error(exc, hint) from None

    def create_alias(self, alias: str, collection: str) -> AliasInfo:
        """A name for `collection` that every call taking a collection takes too
        (the same call again is no error)."""
        return wire.alias(self._aliases("CreateAlias", ranker_pb2.CreateAliasRequest(
            alias=alias, collection=collection)).alias)

    def switch_alias(self, alias: str, collection: str, *, expected: str = "") -> AliasInfo:
        """Point `alias` at `collection` atomically; with `expected`, only if it
        points there now (else ClientError with code ABORTED). The answer's
        `previous` is the target before this switch (switch back to roll back)."""
        return wire.alias(self._aliases("SwitchAlias", ranker_pb2.SwitchAliasRequest(
            alias=alias, collection=collection, expected_collection=expected)).alias)

    def drop_alias(self, alias: str) -> None:
        self._aliases("DropAlias", ranker_pb2.DropAliasRequest(alias=alias))

    def list_aliases(self) -> list[AliasInfo]:
        return [wire.alias(a) for a in self._aliases("ListAliases", ranker_pb2.ListAliasesRequest()).aliases]

    def _deadline(self, items) -> float:
        return self.stream_deadline(len(items) if hasattr(items, "__len__") else 0)
