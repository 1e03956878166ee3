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

class DerivedState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DERIVED_STATE_UNSPECIFIED: _ClassVar[DerivedState]
    DERIVED_STATE_CURRENT: _ClassVar[DerivedState]
    DERIVED_STATE_STALE: _ClassVar[DerivedState]
    DERIVED_STATE_REBUILDING: _ClassVar[DerivedState]
INDEX_KIND_UNSPECIFIED: IndexKind
INDEX_KIND_EXACT: IndexKind
INDEX_KIND_HNSW: IndexKind
INDEX_KIND_IVF_PQ: IndexKind
DERIVED_STATE_UNSPECIFIED: DerivedState
DERIVED_STATE_CURRENT: DerivedState
DERIVED_STATE_STALE: DerivedState
DERIVED_STATE_REBUILDING: DerivedState

class IndexOptions(_message.Message):
    __slots__ = ("kind", "float16", "hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe", "pq_bytes", "no_rerank", "rerank_factor", "dba")
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
    DBA_FIELD_NUMBER: _ClassVar[int]
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
    dba: DatabaseAugmentation
    def __init__(self, kind: _Optional[_Union[IndexKind, str]] = ..., float16: _Optional[bool] = ..., hnsw_m: _Optional[int] = ..., ef_construction: _Optional[int] = ..., ef_search: _Optional[int] = ..., nlist: _Optional[int] = ..., nprobe: _Optional[int] = ..., pq_bytes: _Optional[int] = ..., no_rerank: _Optional[bool] = ..., rerank_factor: _Optional[int] = ..., dba: _Optional[_Union[DatabaseAugmentation, _Mapping]] = ...) -> None: ...

class DatabaseAugmentation(_message.Message):
    __slots__ = ("top_n", "alpha")
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    top_n: int
    alpha: float
    def __init__(self, top_n: _Optional[int] = ..., alpha: _Optional[float] = ...) -> None: ...

class QueryExpansion(_message.Message):
    __slots__ = ("top_n", "alpha")
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    top_n: int
    alpha: float
    def __init__(self, top_n: _Optional[int] = ..., alpha: _Optional[float] = ...) -> None: ...

class KReciprocalRerank(_message.Message):
    __slots__ = ("k1", "k2", "shortlist")
    K1_FIELD_NUMBER: _ClassVar[int]
    K2_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_FIELD_NUMBER: _ClassVar[int]
    SHORTLIST_FIELD_NUMBER: _ClassVar[int]
    k1: int
    k2: int
    shortlist: int
    def __init__(self, k1: _Optional[int] = ..., k2: _Optional[int] = ..., shortlist: _Optional[int] = ..., **kwargs) -> None: ...

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
    __slots__ = ("collection", "name", "vector", "fingerprint", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    collection: str
    name: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    fingerprint: str
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, collection: _Optional[str] = ..., name: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., fingerprint: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

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
    __slots__ = ("collection", "vector", "top_k", "fingerprint", "filters", "with_attributes", "page_size", "query_expansion", "k_reciprocal")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    WITH_ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUERY_EXPANSION_FIELD_NUMBER: _ClassVar[int]
    K_RECIPROCAL_FIELD_NUMBER: _ClassVar[int]
    collection: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    top_k: int
    fingerprint: str
    filters: _containers.RepeatedCompositeFieldContainer[AttributeFilter]
    with_attributes: bool
    page_size: int
    query_expansion: QueryExpansion
    k_reciprocal: KReciprocalRerank
    def __init__(self, collection: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., top_k: _Optional[int] = ..., fingerprint: _Optional[str] = ..., filters: _Optional[_Iterable[_Union[AttributeFilter, _Mapping]]] = ..., with_attributes: _Optional[bool] = ..., page_size: _Optional[int] = ..., query_expansion: _Optional[_Union[QueryExpansion, _Mapping]] = ..., k_reciprocal: _Optional[_Union[KReciprocalRerank, _Mapping]] = ...) -> None: ...

class AttributeFilter(_message.Message):
    __slots__ = ("key", "values")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    key: str
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class Match(_message.Message):
    __slots__ = ("rank", "name", "score", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RANK_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    name: str
    score: float
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, rank: _Optional[int] = ..., name: _Optional[str] = ..., score: _Optional[float] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("match", "matches", "collection", "fingerprint")
    MATCH_FIELD_NUMBER: _ClassVar[int]
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    match: Match
    matches: _containers.RepeatedCompositeFieldContainer[Match]
    collection: str
    fingerprint: str
    def __init__(self, match: _Optional[_Union[Match, _Mapping]] = ..., matches: _Optional[_Iterable[_Union[Match, _Mapping]]] = ..., collection: _Optional[str] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class SearchStreamRequest(_message.Message):
    __slots__ = ("id", "collection", "vector", "top_k", "fingerprint", "filters", "with_attributes", "query_expansion", "k_reciprocal")
    ID_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    WITH_ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    QUERY_EXPANSION_FIELD_NUMBER: _ClassVar[int]
    K_RECIPROCAL_FIELD_NUMBER: _ClassVar[int]
    id: str
    collection: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    top_k: int
    fingerprint: str
    filters: _containers.RepeatedCompositeFieldContainer[AttributeFilter]
    with_attributes: bool
    query_expansion: QueryExpansion
    k_reciprocal: KReciprocalRerank
    def __init__(self, id: _Optional[str] = ..., collection: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., top_k: _Optional[int] = ..., fingerprint: _Optional[str] = ..., filters: _Optional[_Iterable[_Union[AttributeFilter, _Mapping]]] = ..., with_attributes: _Optional[bool] = ..., query_expansion: _Optional[_Union[QueryExpansion, _Mapping]] = ..., k_reciprocal: _Optional[_Union[KReciprocalRerank, _Mapping]] = ...) -> None: ...

class SearchStreamResponse(_message.Message):
    __slots__ = ("id", "matches", "error", "collection", "fingerprint")
    ID_FIELD_NUMBER: _ClassVar[int]
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    id: str
    matches: _containers.RepeatedCompositeFieldContainer[Match]
    error: _common_pb2.ItemError
    collection: str
    fingerprint: str
    def __init__(self, id: _Optional[str] = ..., matches: _Optional[_Iterable[_Union[Match, _Mapping]]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ..., collection: _Optional[str] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    def __init__(self, collection: _Optional[str] = ...) -> None: ...

class CollectionStats(_message.Message):
    __slots__ = ("name", "count", "dim", "fingerprint", "memory_bytes", "created_at", "updated_at", "index", "derived_data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DERIVED_DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    count: int
    dim: int
    fingerprint: str
    memory_bytes: int
    created_at: float
    updated_at: float
    index: IndexOptions
    derived_data: DerivedData
    def __init__(self, name: _Optional[str] = ..., count: _Optional[int] = ..., dim: _Optional[int] = ..., fingerprint: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., index: _Optional[_Union[IndexOptions, _Mapping]] = ..., derived_data: _Optional[_Union[DerivedData, _Mapping]] = ...) -> None: ...

class DerivedData(_message.Message):
    __slots__ = ("state", "generation", "built_generation", "building_since", "last_build_seconds", "kinds")
    STATE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    BUILT_GENERATION_FIELD_NUMBER: _ClassVar[int]
    BUILDING_SINCE_FIELD_NUMBER: _ClassVar[int]
    LAST_BUILD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    state: DerivedState
    generation: int
    built_generation: int
    building_since: float
    last_build_seconds: float
    kinds: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, state: _Optional[_Union[DerivedState, str]] = ..., generation: _Optional[int] = ..., built_generation: _Optional[int] = ..., building_since: _Optional[float] = ..., last_build_seconds: _Optional[float] = ..., kinds: _Optional[_Iterable[str]] = ...) -> None: ...

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

class ListItemsRequest(_message.Message):
    __slots__ = ("collection", "page_size", "start_after", "limit", "filters", "with_vectors")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    START_AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    WITH_VECTORS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    page_size: int
    start_after: str
    limit: int
    filters: _containers.RepeatedCompositeFieldContainer[AttributeFilter]
    with_vectors: bool
    def __init__(self, collection: _Optional[str] = ..., page_size: _Optional[int] = ..., start_after: _Optional[str] = ..., limit: _Optional[int] = ..., filters: _Optional[_Iterable[_Union[AttributeFilter, _Mapping]]] = ..., with_vectors: _Optional[bool] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("name", "attributes", "created_at", "updated_at", "fingerprint", "vector")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    attributes: _containers.ScalarMap[str, str]
    created_at: float
    updated_at: float
    fingerprint: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., fingerprint: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ...) -> None: ...

class ListItemsResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ...) -> None: ...

class RenameRequest(_message.Message):
    __slots__ = ("collection", "renamings", "in_order")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    RENAMINGS_FIELD_NUMBER: _ClassVar[int]
    IN_ORDER_FIELD_NUMBER: _ClassVar[int]
    collection: str
    renamings: _containers.RepeatedCompositeFieldContainer[Renaming]
    in_order: bool
    def __init__(self, collection: _Optional[str] = ..., renamings: _Optional[_Iterable[_Union[Renaming, _Mapping]]] = ..., in_order: _Optional[bool] = ...) -> None: ...

class Renaming(_message.Message):
    __slots__ = ("from_name", "to_name")
    FROM_NAME_FIELD_NUMBER: _ClassVar[int]
    TO_NAME_FIELD_NUMBER: _ClassVar[int]
    from_name: str
    to_name: str
    def __init__(self, from_name: _Optional[str] = ..., to_name: _Optional[str] = ...) -> None: ...

class RenameResponse(_message.Message):
    __slots__ = ("renamed", "not_found")
    RENAMED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    renamed: int
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, renamed: _Optional[int] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...

class Alias(_message.Message):
    __slots__ = ("name", "collection", "previous_collection")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_COLLECTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    collection: str
    previous_collection: str
    def __init__(self, name: _Optional[str] = ..., collection: _Optional[str] = ..., previous_collection: _Optional[str] = ...) -> None: ...

class CreateAliasRequest(_message.Message):
    __slots__ = ("alias", "collection")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    alias: str
    collection: str
    def __init__(self, alias: _Optional[str] = ..., collection: _Optional[str] = ...) -> None: ...

class CreateAliasResponse(_message.Message):
    __slots__ = ("alias",)
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    alias: Alias
    def __init__(self, alias: _Optional[_Union[Alias, _Mapping]] = ...) -> None: ...

class SwitchAliasRequest(_message.Message):
    __slots__ = ("alias", "collection", "expected_collection")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_COLLECTION_FIELD_NUMBER: _ClassVar[int]
    alias: str
    collection: str
    expected_collection: str
    def __init__(self, alias: _Optional[str] = ..., collection: _Optional[str] = ..., expected_collection: _Optional[str] = ...) -> None: ...

class SwitchAliasResponse(_message.Message):
    __slots__ = ("alias",)
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    alias: Alias
    def __init__(self, alias: _Optional[_Union[Alias, _Mapping]] = ...) -> None: ...

class DropAliasRequest(_message.Message):
    __slots__ = ("alias",)
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    alias: str
    def __init__(self, alias: _Optional[str] = ...) -> None: ...

class DropAliasResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAliasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAliasesResponse(_message.Message):
    __slots__ = ("aliases",)
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    aliases: _containers.RepeatedCompositeFieldContainer[Alias]
    def __init__(self, aliases: _Optional[_Iterable[_Union[Alias, _Mapping]]] = ...) -> None: ...
