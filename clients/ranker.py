"""`RankerClient`: the RankerService through its generated stub, with a
deadline on every call and gRPC's retry on UNAVAILABLE."""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Iterator, Sequence

import grpc
import numpy as np

from clients.base import ServiceClient, status_from_code
from clients.channels import DEFAULT_MAX_MESSAGE_BYTES, RetryPolicy, Security
from clients.errors import SERVE_HINT, UsageError
from imagesearch import defaults
from imagesearch.v1 import ranker_pb2, ranker_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = ranker_pb2.DESCRIPTOR.services_by_name["RankerService"].full_name
DEFAULT_ADDRESS = defaults.RANKER_ADDRESS
ADDRESS_ENV = defaults.RANKER_ENV
HINT = SERVE_HINT.format(flag="--ranker", env=ADDRESS_ENV)
PER_ITEM_S = 2.0


@dataclasses.dataclass(frozen=True)
class Match:
    rank: int
    name: str
    score: float


@dataclasses.dataclass
class SearchResult:
    """One query's answer from SearchStream: matches, or an error."""

    id: str
    matches: list[Match]
    code: grpc.StatusCode | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.code is None


def _vector(vector) -> list[float]:
    return np.asarray(vector, dtype=np.float32).ravel().tolist()


class RankerClient(ServiceClient):
    what = "ranker"
    hint = HINT
    service = SERVICE
    stub_class = ranker_pb2_grpc.RankerServiceStub

    def __init__(self, address: str = DEFAULT_ADDRESS, *, security: Security | None = None,
                 timeout: float = 30.0, retry: RetryPolicy | None = RetryPolicy(),
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, per_item_s: float = PER_ITEM_S):
        if "," in address and not address.startswith(("ipv4:", "ipv6:", "dns:")):
            raise UsageError(f"--ranker takes one address, not a list ({address!r}): "
                             "the ranker holds the gallery, so all clients must talk to the same one")
        super().__init__(address, security=security, timeout=timeout, retry=retry,
                         max_message_bytes=max_message_bytes, per_item_s=per_item_s)

    # ------------------------------------------------------------------ calls

    def stats(self, collection: str = "") -> ranker_pb2.GetStatsResponse:
        try:
            return self.stub.GetStats(ranker_pb2.GetStatsRequest(collection=collection), timeout=self.timeout)
        except grpc.RpcError as exc:
            hint = ""
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                hint = f"index a gallery into it first: imagesearch index GALLERY_DIR --collection {collection}"
            raise self._error(exc, hint) from None

    def upsert(self, requests: Iterable[ranker_pb2.UpsertRequest], *, timeout: float | None = None,
               expected_items: int = 0) -> ranker_pb2.UpsertResponse:
        """One Upsert call over `requests` (which may be a generator fed by an
        embedding stream). Returns what the server committed."""
        try:
            return self.stub.Upsert(iter(requests), timeout=timeout or self.stream_deadline(expected_items))
        except grpc.RpcError as exc:
            hint = ""
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                hint = ("the collection holds vectors of another model: index into a new --collection, "
                        "or delete this one's database and index again")
            raise self._error(exc, hint) from None

    def upsert_vectors(self, collection: str, items: Iterable[tuple[str, Sequence[float]]],
                       fingerprint: str, *, timeout: float | None = None) -> ranker_pb2.UpsertResponse:
        items = list(items)
        return self.upsert((ranker_pb2.UpsertRequest(collection=collection, name=name, vector=_vector(v),
                                                     fingerprint=fingerprint) for name, v in items),
                           timeout=timeout, expected_items=len(items))

    def delete(self, collection: str, names: Sequence[str]) -> ranker_pb2.DeleteResponse:
        try:
            return self.stub.Delete(ranker_pb2.DeleteRequest(collection=collection, names=list(names)),
                                    timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def search(self, collection: str, vector, *, top_k: int = 10, fingerprint: str = "",
               timeout: float | None = None) -> list[Match]:
        """One query -> its ranked matches, best first."""
        request = ranker_pb2.SearchRequest(collection=collection, vector=_vector(vector), top_k=top_k,
                                           fingerprint=fingerprint)
        try:
            return [Match(r.match.rank, r.match.name, r.match.score)
                    for r in self.stub.Search(request, timeout=timeout or self.timeout)]
        except grpc.RpcError as exc:
            raise self._error(exc, self._search_hint(exc, collection)) from None

    @staticmethod
    def _search_hint(exc: grpc.RpcError, collection: str) -> str:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return f"index a gallery first: imagesearch index GALLERY_DIR --collection {collection}"
        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
            return "the gallery was indexed with another model: index it again with the model you query with"
        return ""

    def search_stream(self, requests: Iterable[ranker_pb2.SearchStreamRequest], *,
                      timeout: float | None = None, expected_items: int = 0) -> Iterator[SearchResult]:
        """SearchStream: one answer per request id, as they arrive."""
        call = self.stub.SearchStream(iter(requests), timeout=timeout or self.stream_deadline(expected_items))
        try:
            for reply in call:
                matches = [Match(m.rank, m.name, m.score) for m in reply.matches]
                if reply.HasField("error") and reply.error.code:
                    yield SearchResult(reply.id, matches, status_from_code(reply.error.code), reply.error.message)
                else:
                    yield SearchResult(reply.id, matches)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        finally:
            call.cancel()
