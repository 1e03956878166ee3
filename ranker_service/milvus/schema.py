"""How the Milvus backend lays out its data in Milvus: collection names,
limits, index types and parameters, filter expressions, and `Coll`, one
collection's settings as the settings collection (`SETTINGS`) holds them."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence

from ranker_service.topk import score_margin
from ranker_service.types import HNSW, IVF_PQ, AttributeFilter, IndexSpec

MIN_DIM, MAX_DIM = 2, 32768
MAX_SEARCH_LIMIT = 16384
MAX_NAME_BYTES = 16384
SETTINGS = "imagesearch_collections"
ALIASES = "imagesearch_aliases"  # what Milvus does not keep of an alias (milvus/aliases.py)
CONSISTENCY = "Strong"
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_]")


def collection_schema(dim: int):
    """The Milvus schema of one of our collections: the name as primary key,
    the vector, the times and the attributes as JSON."""
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("name", DataType.VARCHAR, is_primary=True, max_length=MAX_NAME_BYTES)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("created_at", DataType.DOUBLE)
    schema.add_field("updated_at", DataType.DOUBLE)
    schema.add_field("attributes", DataType.JSON)
    return schema


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


def index_params(spec: IndexSpec) -> tuple[str, dict, dict]:
    """(Milvus index type, build params, search params) for a spec."""
    if spec.kind == HNSW:
        return "HNSW", {"M": spec.hnsw_m, "efConstruction": spec.ef_construction}, {"ef": spec.ef_search}
    if spec.kind == IVF_PQ:
        return "IVF_PQ", {"nlist": spec.nlist, "m": spec.pq_bytes, "nbits": 8}, {"nprobe": spec.nprobe}
    return "FLAT", {}, {}


class Coll:
    def __init__(self, name: str, dim: int, fingerprint: str, spec: IndexSpec, created_at: float,
                 updated_at: float):
        self.name, self.dim, self.fingerprint, self.spec = name, dim, fingerprint, spec
        self.created_at, self.updated_at = created_at, updated_at
        self.key = milvus_name(name)
        self.margin = score_margin(dim)


