"""Between the generated messages and the library's types (clients.types):
the only module besides the two clients that reads or builds protobuf.

Vectors go into a request as the proto's packed `repeated float` bytes made
straight from the float32 array (no Python list of floats on the way), and
come out of an answer as a float32 array."""

from __future__ import annotations

import grpc
import numpy as np
from google.protobuf import descriptor

from clients.types import (
    AliasInfo,
    CollectionStats,
    DeleteResult,
    Failure,
    KReciprocal,
    Match,
    ModelInfo,
    QueryExpansion,
    RenameResult,
    Stats,
    StoredItem,
    UpsertResult,
)
from imagesearch.v1 import common_pb2, embedder_pb2, ranker_pb2

_CODES = {status.value[0]: status for status in grpc.StatusCode}


def status_from_code(code: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a numeric code (as in common.ItemError)."""
    return _CODES.get(code, grpc.StatusCode.UNKNOWN)


def failure(name: str, error: common_pb2.ItemError) -> Failure:
    return Failure(name, status_from_code(error.code), error.message)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def set_vector(message, vector, field: str = "vector"):
    """Append `vector` (any array-like, made float32 little-endian) to the packed
    `repeated float` field of `message`, as its wire bytes. Returns `message`."""
    f = message.DESCRIPTOR.fields_by_name[field]
    if f.type != descriptor.FieldDescriptor.TYPE_FLOAT or not f.is_repeated:
        raise TypeError(f"{message.DESCRIPTOR.name}.{field} is not a repeated float field")
    data = np.ascontiguousarray(np.asarray(vector, dtype="<f4").ravel()).tobytes()
    message.MergeFromString(_varint(f.number << 3 | 2) + _varint(len(data)) + data)
    return message


def vector(values) -> np.ndarray:
    """A repeated float field as a float32 array."""
    return np.asarray(values, dtype=np.float32)


def model_info(reply: embedder_pb2.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        backbone=reply.backbone, dim=reply.dim, input_size=reply.input_size, mean=tuple(reply.mean),
        std=tuple(reply.std), device=reply.device, fingerprint=reply.fingerprint, weights=reply.weights,
        interpolation=reply.interpolation, class_names=tuple(reply.class_names),
        max_image_bytes=reply.max_image_bytes, max_image_pixels=reply.max_image_pixels, max_batch=reply.max_batch,
        max_message_bytes=reply.max_message_bytes, max_streams=reply.max_streams,
        stream_window=reply.stream_window, model=reply.model)


def match(m: ranker_pb2.Match) -> Match:
    return Match(m.rank, m.name, m.score, dict(m.attributes))


def filters(spec) -> list[ranker_pb2.AttributeFilter]:
    """AttributeFilters from {key: value or [values]} (one value: equality; several: IN)."""
    return [ranker_pb2.AttributeFilter(key=k, values=[v] if isinstance(v, str) else list(v))
            for k, v in (spec or {}).items()]


def alias(a: ranker_pb2.Alias) -> AliasInfo:
    return AliasInfo(a.name, a.collection, a.previous_collection)


def stored_item(i: ranker_pb2.Item) -> StoredItem:
    return StoredItem(i.name, dict(i.attributes), i.created_at, i.updated_at, i.fingerprint,
                      vector(i.vector) if len(i.vector) else None)


def rename_result(reply: ranker_pb2.RenameResponse) -> RenameResult:
    return RenameResult(reply.renamed, tuple(reply.not_found))


_KINDS = {ranker_pb2.INDEX_KIND_UNSPECIFIED: "exact", ranker_pb2.INDEX_KIND_EXACT: "exact",
          ranker_pb2.INDEX_KIND_HNSW: "hnsw", ranker_pb2.INDEX_KIND_IVF_PQ: "ivf_pq"}


def collection_stats(c: ranker_pb2.CollectionStats) -> CollectionStats:
    kind = _KINDS.get(c.index.kind, "exact")
    if kind == "exact" and c.index.float16:
        kind = "exact16"
    return CollectionStats(c.name, c.count, c.dim, c.fingerprint, c.memory_bytes, c.created_at, c.updated_at,
                           kind)


def stats(reply: ranker_pb2.GetStatsResponse) -> Stats:
    return Stats(tuple(collection_stats(c) for c in reply.collections), reply.memory_bytes, reply.max_top_k)


def index_options(kind: str = "exact") -> ranker_pb2.IndexOptions:
    """IndexOptions for a kind (exact, exact16, hnsw, ivf_pq; parameters at their defaults)."""
    kinds = {"exact": ranker_pb2.INDEX_KIND_EXACT, "exact16": ranker_pb2.INDEX_KIND_EXACT,
             "hnsw": ranker_pb2.INDEX_KIND_HNSW, "ivf_pq": ranker_pb2.INDEX_KIND_IVF_PQ}
    if kind not in kinds:
        raise ValueError(f"unknown index kind {kind!r}: use one of {', '.join(kinds)}")
    return ranker_pb2.IndexOptions(kind=kinds[kind], float16=kind == "exact16")


def rerank_fields(query_expansion: QueryExpansion | None, k_reciprocal: KReciprocal | None) -> dict:
    """The re-ranking fields of a SearchRequest / SearchStreamRequest (absent: off)."""
    out = {}
    if query_expansion is not None:
        out["query_expansion"] = ranker_pb2.QueryExpansion(top_n=query_expansion.top_n, alpha=query_expansion.alpha)
    if k_reciprocal is not None:
        out["k_reciprocal"] = ranker_pb2.KReciprocalRerank(k1=k_reciprocal.k1, k2=k_reciprocal.k2,
                                                           shortlist=k_reciprocal.shortlist,
                                                           **{"lambda": k_reciprocal.lam})
    return out


def upsert_result(reply: ranker_pb2.UpsertResponse) -> UpsertResult:
    return UpsertResult(reply.upserted, reply.inserted, reply.replaced)


def delete_result(reply: ranker_pb2.DeleteResponse) -> DeleteResult:
    return DeleteResult(reply.deleted, tuple(reply.not_found))
