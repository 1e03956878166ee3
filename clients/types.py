"""What the client library hands its callers: plain typed values, no protobuf.

An item's outcome is an `Embedding` or a `SearchResult` (`ok` is True) or a
`Failure` (`ok` is False) naming the item, the status code and the message.
Vectors are float32 numpy arrays."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np

from clients.errors import INPUT_CODES


@dataclasses.dataclass(frozen=True)
class Failure:
    """One item that was not done: its name, the status code, and why."""

    name: str
    code: grpc.StatusCode
    message: str

    ok = False

    @property
    def is_input_error(self) -> bool:
        """True when the item itself is at fault (undecodable, too large...),
        not a service: the same codes that make a call a usage error."""
        return self.code in INPUT_CODES

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


@dataclasses.dataclass(frozen=True, eq=False)
class Embedding:
    """One image's unit vector (float32) and the fingerprint of the model that made it."""

    name: str
    vector: np.ndarray
    fingerprint: str = ""

    ok = True


@dataclasses.dataclass(frozen=True)
class Match:
    """One gallery item in a ranking: 1-based rank, its name, its cosine
    score, and its attributes when the search asked for them."""

    rank: int
    name: str
    score: float
    attributes: dict[str, str] = dataclasses.field(default_factory=dict, compare=False)


@dataclasses.dataclass(frozen=True)
class QueryExpansion:
    """Alpha-weighted query expansion of a search (docs/ranker.md#re-ranking):
    the first pass's `top_n` matches, weighted by max(score, 0)^alpha, are
    added to the query, which is searched again. 0 / None: the server's
    defaults (2 and 3.0)."""

    top_n: int = 0
    alpha: float | None = None


@dataclasses.dataclass(frozen=True)
class KReciprocal:
    """k-reciprocal re-ranking of a search (Zhong et al. 2017; SQLite backend).
    0 / None: the server's defaults (k1 20, k2 6, lambda 0.3, shortlist 100).
    Scores are then lambda * cosine + (1 - lambda) * (1 - Jaccard distance)."""

    k1: int = 0
    k2: int = 0
    lam: float | None = None
    shortlist: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class StoredItem:
    """One item of a collection (ListItems): its name, attributes, times,
    fingerprint, and its stored unit vector when asked for."""

    name: str
    attributes: dict[str, str]
    created_at: float
    updated_at: float
    fingerprint: str
    vector: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """One query's ranked matches, best first, and the collection that
    answered (its alias resolved) and its fingerprint."""

    name: str
    matches: list[Match]
    collection: str = ""
    fingerprint: str = ""

    ok = True


class Matches(list):
    """`RankerClient.search`'s answer: a list of Match, best first, with the
    collection that answered (its alias resolved) and its fingerprint ("" for
    both when nothing matched: the server sends no message then)."""

    def __init__(self, matches=(), collection: str = "", fingerprint: str = ""):
        super().__init__(matches)
        self.collection = collection
        self.fingerprint = fingerprint


@dataclasses.dataclass(frozen=True)
class AliasInfo:
    """An alias: its name, the collection it points to, and the one it pointed
    to before its last switch ("" before the first), for a roll-back."""

    name: str
    collection: str
    previous: str


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the embedder serves (GetModelInfo)."""

    backbone: str
    dim: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: str
    fingerprint: str
    weights: str
    interpolation: str
    class_names: tuple[str, ...]
    max_image_bytes: int
    max_image_pixels: int
    max_batch: int
    max_message_bytes: int
    max_streams: int = 0  # EmbedStream calls the server keeps open at once (0: no cap)
    stream_window: int = 0  # items of one EmbedStream the server holds at once
    model: str = ""  # its name in the embedder ("default" for one model served with the single-model flags)


@dataclasses.dataclass(frozen=True)
class CollectionStats:
    name: str
    count: int
    dim: int
    fingerprint: str
    memory_bytes: int
    created_at: float
    updated_at: float
    kind: str = "exact"


@dataclasses.dataclass(frozen=True)
class Stats:
    """The ranker's collections (GetStats)."""

    collections: tuple[CollectionStats, ...]
    memory_bytes: int
    max_top_k: int

    def collection(self, name: str) -> CollectionStats | None:
        return next((c for c in self.collections if c.name == name), None)


@dataclasses.dataclass(frozen=True)
class UpsertResult:
    """What the ranker committed from one Upsert call."""

    upserted: int
    inserted: int
    replaced: int


@dataclasses.dataclass(frozen=True)
class RenameResult:
    renamed: int
    not_found: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class DeleteResult:
    deleted: int
    not_found: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class BackupResult:
    """A copy of the ranker's database written by `RankerClient.backup`."""

    path: str
    size: int
    sha256: str
    collections: int
    vectors: int
