"""Index kinds of a collection and their parameters (no FAISS, no gRPC here).

- `exact`: every vector in one matrix, a full product per query: float32 rows
  (exact float64 ranking, see `ranking.py`) or float16 rows (`float16=True`:
  half the memory, scores within ~1e-3 of float32).
- `hnsw`: FAISS IndexHNSWFlat (graph of `hnsw_m` links per node, built with
  `ef_construction`, searched with `ef_search`).
- `ivf_pq`: FAISS IndexIVFPQ (`nlist` lists, `nprobe` probed per query,
  `pq_bytes` bytes of code per vector); the full float32 vectors for the
  re-rank stay in a file on disk, read with pread (page cache, not process
  memory).

ANN kinds fetch `rerank_factor` x top_k candidates (at least `MIN_CANDIDATES`)
and re-rank them exactly in float64 from the stored float32 vectors when
`rerank` is on (the default): the scores returned are then the exact cosine
similarities and ties are broken by name, as for `exact`.

A spec is stored as JSON in the `collections` table (`kind`, `params`).
"""

from __future__ import annotations

import dataclasses
import json

from imagesearch import errors

EXACT, HNSW, IVF_PQ = "exact", "hnsw", "ivf_pq"
KINDS = (EXACT, HNSW, IVF_PQ)
MIN_CANDIDATES = 64
# An ANN collection is rebuilt (dead FAISS ids dropped) once dead ids make up
# more than this share of its index.
REBUILD_DEAD_SHARE = 0.25
# ... and at least this many (so small collections are not rebuilt on every delete).
REBUILD_MIN_DEAD = 1024


# Defaults that differ by kind. ivf_pq: 64-byte codes cannot order vectors whose
# scores differ by ~0.01 (a cluster of near-duplicates), so it probes more lists and
# re-ranks 50 x top_k candidates from disk; hnsw re-ranks 30 x top_k candidates
# (the defaults that reach recall@10 near 1 at 1M vectors in bench/ranker_kinds.py).
KIND_DEFAULTS = {"ivf_pq": {"nprobe": 64, "rerank_factor": 50}, "hnsw": {"rerank_factor": 30}}


@dataclasses.dataclass(frozen=True)
class IndexSpec:
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

    def check_dim(self, dim: int, what: str) -> None:
        if self.kind == IVF_PQ and dim % self.pq_bytes:
            raise errors.InvalidArgument(
                f"{what}: ivf_pq needs pq_bytes ({self.pq_bytes}) to divide the dimension ({dim})")


def make_spec(kind: str = EXACT, *, what: str = "index options", **params) -> IndexSpec:
    """A validated spec; a parameter left 0/None takes its default.
    InvalidArgument for an unknown kind or an out-of-range parameter."""
    kind = kind or EXACT
    if kind not in KINDS:
        raise errors.InvalidArgument(f"{what}: unknown index kind {kind!r}: use one of {', '.join(KINDS)}")
    fields = {f.name for f in dataclasses.fields(IndexSpec)} - {"kind"}
    unknown = set(params) - fields
    if unknown:
        raise errors.InvalidArgument(f"{what}: unknown index parameters {sorted(unknown)}")
    given = {k: v for k, v in params.items() if v not in (None, 0) or isinstance(v, bool)}
    given = {**KIND_DEFAULTS.get(kind, {}), **given}
    if kind != EXACT and given.get("float16"):
        raise errors.InvalidArgument(f"{what}: float16 applies to the exact kind only")
    spec = IndexSpec(kind=kind, **given)
    for name, low, high in (("hnsw_m", 4, 256), ("ef_construction", 8, 4096), ("ef_search", 1, 32768),
                            ("nlist", 1, 1 << 20), ("nprobe", 1, 1 << 20), ("pq_bytes", 1, 1024),
                            ("rerank_factor", 1, 1000)):
        value = getattr(spec, name)
        if not low <= value <= high:
            raise errors.InvalidArgument(f"{what}: {name} = {value} is out of range {low}..{high}")
    if spec.nprobe > spec.nlist:
        spec = dataclasses.replace(spec, nprobe=spec.nlist)
    return spec


def spec_from_json(kind: str, params: str) -> IndexSpec:
    return make_spec(kind, what="stored index options", **json.loads(params or "{}"))
