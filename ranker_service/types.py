"""The ranker's value types: what the servicer, the backends and the indexes
pass to each other. Plain frozen dataclasses and the index kinds' names
(docs/ranker.md#index-kinds); the checks that build them are in validation.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from imagesearch import defaults

EXACT, HNSW, IVF_PQ = "exact", "hnsw", "ivf_pq"
KINDS = (EXACT, HNSW, IVF_PQ)
MIN_CANDIDATES = 64


@dataclasses.dataclass(frozen=True)
class IndexSpec:
    """A collection's index kind and parameters (validation.make_spec builds checked ones)."""

    kind: str = EXACT
    float16: bool = False
    hnsw_m: int = 32
    ef_construction: int = 64
    ef_search: int = 256
    nlist: int = 1024
    nprobe: int = 32
    pq_bytes: int = 64
    rerank: bool = True
    rerank_factor: int = 10

    @property
    def label(self) -> str:
        """exact, exact16, hnsw or ivf_pq (the benchmark's names)."""
        return "exact16" if self.kind == EXACT and self.float16 else self.kind

    def params(self) -> dict:
        """The parameters that matter for this kind (for stats and storage)."""
        if self.kind == EXACT:
            return {"float16": self.float16}
        common = {"rerank": self.rerank, "rerank_factor": self.rerank_factor}
        if self.kind == HNSW:
            return {"hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction, "ef_search": self.ef_search,
                    **common}
        return {"nlist": self.nlist, "nprobe": self.nprobe, "pq_bytes": self.pq_bytes, **common}

    def build_params(self) -> dict:
        """The parameters the built index depends on (not ef_search, nprobe or
        the re-rank, which only steer searches): index files must match these."""
        search_only = {"ef_search", "nprobe", "rerank", "rerank_factor"}
        return {k: v for k, v in self.params().items() if k not in search_only}

    def to_json(self) -> str:
        return json.dumps(self.params(), sort_keys=True)

    def candidates(self, k: int, n: int) -> int:
        """How many ANN candidates to fetch for a top-k out of n vectors."""
        return min(n, max(k * self.rerank_factor, MIN_CANDIDATES, k))


@dataclasses.dataclass(frozen=True)
class AttributeFilter:
    """Passes an item whose value of `key` is one of `values` (validation.check_filters)."""

    key: str
    values: frozenset[str]

    def passes(self, attributes: Mapping[str, str]) -> bool:
        value = attributes.get(self.key)
        return value is not None and value in self.values


@dataclasses.dataclass(frozen=True)
class Expansion:
    """Alpha-weighted query expansion of one query (validation.make_expansion)."""

    top_n: int = defaults.DEFAULT_QE_TOP_N
    alpha: float = defaults.DEFAULT_QE_ALPHA


@dataclasses.dataclass(frozen=True)
class KReciprocal:
    """k-reciprocal re-ranking of one query's shortlist (validation.make_k_reciprocal)."""

    k1: int = defaults.DEFAULT_KR_K1
    k2: int = defaults.DEFAULT_KR_K2
    lam: float = defaults.DEFAULT_KR_LAMBDA
    shortlist: int = defaults.DEFAULT_KR_SHORTLIST


@dataclasses.dataclass(frozen=True)
class Query:
    collection: str
    vector: Sequence[float] | np.ndarray
    top_k: int = 0  # 0 = default
    fingerprint: str = ""  # "" = no check
    id: str = ""
    filters: tuple[AttributeFilter, ...] = ()  # checked (validation.check_filters)
    with_attributes: bool = False
    expansion: Expansion | None = None
    k_reciprocal: KReciprocal | None = None
    deadline: float | None = None  # time.monotonic() by which the caller wants its answer (None: no limit)

    @property
    def reranked(self) -> bool:
        return self.expansion is not None or self.k_reciprocal is not None


@dataclasses.dataclass(frozen=True)
class Match:
    rank: int  # 1-based
    name: str
    score: float  # cosine similarity (float64 computed)
    attributes: Mapping[str, str] = dataclasses.field(default_factory=dict)  # when the query asked for them


@dataclasses.dataclass(frozen=True)
class DerivedStatus:
    """A collection's derived re-ranking data (rerank/cache.py)."""

    state: str  # "none" (nothing derived is wanted), "current", "stale" (a rebuild is due), "rebuilding"
    generation: int  # the collection's last write
    built_generation: int  # the oldest tag among the wanted values (-1: one was never built)
    building_since: float  # unix seconds the running rebuild began (0: none runs)
    last_build_seconds: float  # how long the last finished rebuild took (0: none yet)
    kinds: tuple[str, ...]  # what is derived: "k-reciprocal k1=20 k2=6"


@dataclasses.dataclass(frozen=True)
class CollectionStats:
    name: str
    count: int
    dim: int
    fingerprint: str
    memory_bytes: int
    created_at: float
    updated_at: float
    spec: IndexSpec = dataclasses.field(default_factory=IndexSpec)
    derived: DerivedStatus | None = None  # SQLite backend only


@dataclasses.dataclass(frozen=True)
class Alias:
    """A name for a collection (docs/ranker.md#aliases)."""

    name: str
    collection: str  # the collection it points to
    previous: str = ""  # the target before its last switch ("" before the first)


@dataclasses.dataclass(frozen=True)
class Target:
    """What a collection name or an alias resolves to: the collection and its
    fingerprint ("" for a collection that does not exist)."""

    collection: str
    fingerprint: str = ""


@dataclasses.dataclass(frozen=True)
class UpsertItem:
    collection: str
    name: str
    vector: Sequence[float] | np.ndarray
    fingerprint: str = ""
    attributes: Mapping[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class Pending:
    """An upsert item once checked (validation.pending_item)."""

    index: int  # its position in the call
    collection: str
    name: str
    vector: np.ndarray  # float32 unit
    fingerprint: str
    attributes: dict[str, str]
    what: str  # "item 3 (name 'a.jpg')", for messages


@dataclasses.dataclass(frozen=True)
class UpsertResult:
    upserted: int
    inserted: int
    replaced: int


@dataclasses.dataclass(frozen=True)
class DeleteResult:
    deleted: int
    not_found: list[str]


@dataclasses.dataclass(frozen=True)
class RenameResult:
    renamed: int
    not_found: list[str]


@dataclasses.dataclass(frozen=True)
class StoredItem:
    name: str
    attributes: str  # JSON
    created_at: float
    updated_at: float
    fingerprint: str
    vector: np.ndarray | None  # float32, when asked for


@dataclasses.dataclass(frozen=True)
class ItemPage:
    items: list[StoredItem]  # attributes as JSON text, in name order
    last: str  # the last name read ("" when none): where the next page starts


@dataclasses.dataclass(frozen=True)
class LoadReport:
    collections: int
    vectors: int
    seconds: float
    memory_bytes: int


@dataclasses.dataclass(frozen=True)
class BackupCopy:
    path: Path
    size: int
    sha256: str
    collections: int
    vectors: int
    seconds: float  # how long writes waited for the copy
