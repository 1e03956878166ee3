from imagesearch.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IndexKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INDEX_KIND_UNSPECIFIED: _ClassVar[IndexKind]
    INDEX_KIND_EXACT: _ClassVar[IndexKind]
    INDEX_KIND_HNSW: _ClassVar[IndexKind]
    INDEX_KIND_IVF_PQ: _ClassVar[IndexKind]
INDEX_KIND_UNSPECIFIED: IndexKind
INDEX_KIND_EXACT: IndexKind
INDEX_KIND_HNSW: IndexKind
INDEX_KIND_IVF_PQ: IndexKind

class IndexOptions(_message.Message):
    __slots__ = ("kind", "float16", "hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe", "pq_bytes", "no_rerank", "rerank_factor")
    KIND_FIELD_NUMBER: _ClassVar[int]
    FLOAT16_FIELD_NUMBER: _ClassVar[int]
    HNSW_M_FIELD_NUMBER: _ClassVar[int]
    EF_CONSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    NLIST_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    PQ_BYTES_FIELD_NUMBER: _ClassVar[int]
    NO_RERANK_FIELD_NUMBER: _ClassVar[int]
    RERANK_FACTOR_FIELD_NUMBER: _ClassVar[int]
    kind: IndexKind
    float16: bool
    hnsw_m: int
    ef_construction: int
    ef_search: int
    nlist: int
    nprobe: int
    pq_bytes: int
    no_rerank: bool
    rerank_factor: int
    def __init__(self, kind: _Optional[_Union[IndexKind, str]] = ..., float16: _Optional[bool] = ..., hnsw_m: _Optional[int] = ..., ef_construction: _Optional[int] = ..., ef_search: _Optional[int] = ..., nlist: _Optional[int] = ..., nprobe: _Optional[int] = ..., pq_bytes: _Optional[int] = ..., no_rerank: _Optional[bool] = ..., rerank_factor: _Optional[int] = ...) -> None: ...

class CreateCollectionRequest(_message.Message):
    __slots__ = ("collection", "dim", "fingerprint", "index")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    collection: str
    dim: int
    fingerprint: str
    index: IndexOptions
    def __init__(self, collection: _Optional[str] = ..., dim: _Optional[int] = ..., fingerprint: _Optional[str] = ..., index: _Optional[_Union[IndexOptions, _Mapping]] = ...) -> None: ...

class CreateCollectionResponse(_message.Message):
    __slots__ = ("collection", "created")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    collection: CollectionStats
    created: bool
    def __init__(self, collection: _Optional[_Union[CollectionStats, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class DropCollectionRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    def __init__(self, collection: _Optional[str] = ...) -> None: ...

class DropCollectionResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("collection", "name", "vector", "fingerprint")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    collection: str
    name: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    fingerprint: str
    def __init__(self, collection: _Optional[str] = ..., name: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("upserted", "inserted", "replaced")
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    INSERTED_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    inserted: int
    replaced: int
    def __init__(self, upserted: _Optional[int] = ..., inserted: _Optional[int] = ..., replaced: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("collection", "names")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    collection: str
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "not_found")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[int] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("collection", "vector", "top_k", "fingerprint")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    collection: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    top_k: int
    fingerprint: str
    def __init__(self, collection: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., top_k: _Optional[int] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class Match(_message.Message):
    __slots__ = ("rank", "name", "score")
    RANK_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    name: str
    score: float
    def __init__(self, rank: _Optional[int] = ..., name: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("match",)
    MATCH_FIELD_NUMBER: _ClassVar[int]
    match: Match
    def __init__(self, match: _Optional[_Union[Match, _Mapping]] = ...) -> None: ...

class SearchStreamRequest(_message.Message):
    __slots__ = ("id", "collection", "vector", "top_k", "fingerprint")
    ID_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    id: str
    collection: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    top_k: int
    fingerprint: str
    def __init__(self, id: _Optional[str] = ..., collection: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., top_k: _Optional[int] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class SearchStreamResponse(_message.Message):
    __slots__ = ("id", "matches", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    matches: _containers.RepeatedCompositeFieldContainer[Match]
    error: _common_pb2.ItemError
    def __init__(self, id: _Optional[str] = ..., matches: _Optional[_Iterable[_Union[Match, _Mapping]]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    def __init__(self, collection: _Optional[str] = ...) -> None: ...

class CollectionStats(_message.Message):
    __slots__ = ("name", "count", "dim", "fingerprint", "memory_bytes", "created_at", "updated_at", "index")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    name: str
    count: int
    dim: int
    fingerprint: str
    memory_bytes: int
    created_at: float
    updated_at: float
    index: IndexOptions
    def __init__(self, name: _Optional[str] = ..., count: _Optional[int] = ..., dim: _Optional[int] = ..., fingerprint: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., index: _Optional[_Union[IndexOptions, _Mapping]] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("collections", "memory_bytes", "max_top_k")
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    collections: _containers.RepeatedCompositeFieldContainer[CollectionStats]
    memory_bytes: int
    max_top_k: int
    def __init__(self, collections: _Optional[_Iterable[_Union[CollectionStats, _Mapping]]] = ..., memory_bytes: _Optional[int] = ..., max_top_k: _Optional[int] = ...) -> None: ...

class BackupRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BackupResponse(_message.Message):
    __slots__ = ("chunk", "total_bytes", "sha256", "collections", "vectors")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    total_bytes: int
    sha256: str
    collections: int
    vectors: int
    def __init__(self, chunk: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., collections: _Optional[int] = ..., vectors: _Optional[int] = ...) -> None: ...
