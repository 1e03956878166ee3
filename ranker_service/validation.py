"""Every request check of the ranker, once, for both backends: names,
collection names, top_k, vectors, attributes and filters, index options,
re-ranking options, and the checks of a request against its collection.

Every check raises an `imagesearch.errors` error (InvalidArgument unless
said otherwise) with a message that names the offending input (`what`, e.g.
"item 3 (name 'a.jpg')" or "query 'q7'"), so callers only add where the
input came from.

Vectors are normalised here, in float64, and stored as float32: the stored
form of a vector `v` is exactly `(v / np.linalg.norm(v)).astype(np.float32)`
with `v` taken as float64 (every float32 is exact in float64, and the norm of
float32 values can neither overflow nor underflow in float64).
"""

from __future__ import annotations

import dataclasses
import json
import math
import unicodedata
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from imagesearch import defaults, errors
from imagesearch.defaults import DEFAULT_TOP_K, MAX_TOP_K
from imagesearch.errors import shorten
from ranker_service.types import (
    EXACT,
    HNSW,
    IVF_PQ,
    KINDS,
    AttributeFilter,
    Expansion,
    IndexSpec,
    KReciprocal,
    Pending,
    Query,
    UpsertItem,
)

MAX_DIM = 65536
MAX_COLLECTION_CHARS = 128
MAX_NAME_CHARS = 4096
DBA_REMOVED = ("index options: dba: database-side augmentation was removed from the ranker; use query expansion "
               "(query_expansion) and k-reciprocal re-ranking (k_reciprocal) per search, and `--tta flip` at the "
               "embedder")


def _has_control_chars(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def check_collection(collection: str, *, what: str = "request", noun: str = "collection") -> str:
    """A collection name, or an alias (`noun`; one namespace, the same rules):
    1..128 characters, no control characters, not blank."""
    if not collection:
        raise errors.InvalidArgument(f"{what}: empty {noun} name: say which {noun} to use")
    if len(collection) > MAX_COLLECTION_CHARS:
        raise errors.InvalidArgument(
            f"{what}: {noun} name {collection[:40]!r}... has {len(collection)} characters; "
            f"at most {MAX_COLLECTION_CHARS} are allowed")
    if not collection.strip():
        raise errors.InvalidArgument(f"{what}: {noun} name {collection!r} is blank")
    if _has_control_chars(collection):
        raise errors.InvalidArgument(f"{what}: {noun} name {collection!r} contains control characters")
    return collection


def check_name(name: str, *, what: str, new: bool = True) -> str:
    """An item name (e.g. a gallery file's relative path): 1..4096 characters, no
    NUL. A `new` name (one to store) has no control characters either: names are
    printed by clients, and ESC, BEL or CR in one could drive their terminal."""
    if not name:
        raise errors.InvalidArgument(f"{what}: empty name: every item needs a name")
    if len(name) > MAX_NAME_CHARS:
        raise errors.InvalidArgument(
            f"{what}: name {name[:40]!r}... has {len(name)} characters; at most {MAX_NAME_CHARS} are allowed")
    if "\x00" in name:
        raise errors.InvalidArgument(f"{what}: name {name!r} contains a NUL character")
    if new and _has_control_chars(name):
        raise errors.InvalidArgument(f"{what}: name {shorten(name)!r} contains control characters "
                                     "(tab, newline, ESC...): names are shown to people; pick a printable name")
    return name


def check_top_k(top_k: int, *, what: str = "request") -> int:
    """0 means the default (10); otherwise 1..MAX_TOP_K."""
    if top_k == 0:
        return DEFAULT_TOP_K
    if not 1 <= top_k <= MAX_TOP_K:
        raise errors.InvalidArgument(f"{what}: top_k {top_k} is out of range: use 1..{MAX_TOP_K} (0 = {DEFAULT_TOP_K})")
    return int(top_k)


def as_float64(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """A 1-d float64 copy of `values` (a protobuf repeated float, a list or an array)."""
    try:
        v = np.array(values, dtype=np.float64)  # fast for protobuf repeated fields (~10 us for 1280)
    except (TypeError, ValueError) as exc:
        raise errors.InvalidArgument(f"vector is not a sequence of numbers: {exc}") from None
    if v.ndim != 1:
        raise errors.InvalidArgument(f"vector has shape {v.shape}: expected one dimension")
    return v


def unit_vector(values: Sequence[float] | np.ndarray, *, what: str, dim: int | None = None) -> np.ndarray:
    """The float64 unit vector of `values`; InvalidArgument when it is empty,
    longer than MAX_DIM, of the wrong dimension (when `dim` is given), holds
    NaN/Inf, or is all zeros."""
    v = as_float64(values)
    n = v.shape[0]
    if n == 0:
        raise errors.InvalidArgument(f"{what}: empty vector")
    if dim is not None and n != dim:
        raise errors.InvalidArgument(f"{what}: vector has {n} values, expected dimension {dim}")
    if n > MAX_DIM:
        raise errors.InvalidArgument(f"{what}: vector has {n} values; at most {MAX_DIM} are allowed")
    finite = np.isfinite(v)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise errors.InvalidArgument(
            f"{what}: vector[{bad}] is {float(v[bad])}: values must be finite (no NaN or Inf)")
    norm = float(np.linalg.norm(v))
    if norm == 0.0:
        raise errors.InvalidArgument(f"{what}: all-zero vector has no direction: it cannot be normalised")
    return v / norm


def stored_form(unit64: np.ndarray) -> np.ndarray:
    """The float32 form a unit vector is stored and searched in."""
    return unit64.astype(np.float32)


def describe_item(index: int, name: str) -> str:
    return f"item {index} (name {shorten(name)!r})"


def describe_query(query: Query, position: int | None = None) -> str:
    if query.id:
        return f"query {query.id!r}"
    return "query" if position is None else f"query #{position}"


# ---------------------------------------------------------------- attributes and filters

def _check_key(key: str, what: str) -> None:
    if not isinstance(key, str) or not key:
        raise errors.InvalidArgument(f"{what}: empty attribute key")
    if len(key) > defaults.MAX_ATTRIBUTE_KEY_CHARS:
        raise errors.InvalidArgument(f"{what}: attribute key {key[:40]!r}... has {len(key)} characters; "
                                     f"at most {defaults.MAX_ATTRIBUTE_KEY_CHARS} are allowed")
    if _has_control_chars(key):
        raise errors.InvalidArgument(f"{what}: attribute key {key!r} contains control characters")


def _check_value(key: str, value: str, what: str) -> None:
    if not isinstance(value, str):
        raise errors.InvalidArgument(f"{what}: attribute {key!r} is not a string")
    if len(value) > defaults.MAX_ATTRIBUTE_VALUE_CHARS:
        raise errors.InvalidArgument(f"{what}: attribute {key!r} has a value of {len(value)} characters; "
                                     f"at most {defaults.MAX_ATTRIBUTE_VALUE_CHARS} are allowed")
    if "\x00" in value:
        raise errors.InvalidArgument(f"{what}: attribute {key!r} has a value with a NUL character")


def check_attributes(attributes: Mapping[str, str] | None, *, what: str) -> dict[str, str]:
    """A validated plain copy of an item's attributes (InvalidArgument past the limits)."""
    if not attributes:
        return {}
    if len(attributes) > defaults.MAX_ATTRIBUTES:
        raise errors.InvalidArgument(f"{what}: {len(attributes)} attributes; "
                                     f"at most {defaults.MAX_ATTRIBUTES} are allowed")
    out = {}
    for key, value in attributes.items():
        _check_key(key, what)
        _check_value(key, value, what)
        out[key] = value
    return out


def check_filters(filters: Iterable[tuple[str, Sequence[str]]], *, what: str) -> tuple[AttributeFilter, ...]:
    """Validated filters from (key, values) pairs; filters on the same key
    intersect (both must pass)."""
    out = []
    for i, (key, values) in enumerate(filters):
        if i >= defaults.MAX_FILTERS:
            raise errors.InvalidArgument(f"{what}: more than {defaults.MAX_FILTERS} attribute filters")
        _check_key(key, f"{what}: filter {i}")
        values = list(values)
        if not values:
            raise errors.InvalidArgument(f"{what}: filter {i} on {key!r} has no values: it would pass nothing")
        if len(values) > defaults.MAX_FILTER_VALUES:
            raise errors.InvalidArgument(f"{what}: filter {i} on {key!r} has {len(values)} values; "
                                         f"at most {defaults.MAX_FILTER_VALUES} are allowed")
        for value in values:
            _check_value(key, value, f"{what}: filter {i}")
        out.append(AttributeFilter(key, frozenset(values)))
    return tuple(out)


def passes(attributes: Mapping[str, str], filters: Sequence[AttributeFilter]) -> bool:
    return all(f.passes(attributes) for f in filters)


def to_json(attributes: Mapping[str, str]) -> str:
    """The stored form: compact JSON with sorted keys ('{}' for none)."""
    return json.dumps(dict(attributes), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def from_json(text: str | None) -> dict[str, str]:
    return json.loads(text) if text and text != "{}" else {}


# ---------------------------------------------------------------- index and re-ranking options

# Defaults that differ by kind. ivf_pq: 64-byte codes cannot order vectors whose
# scores differ by ~0.01 (a cluster of near-duplicates), so it probes more lists and
# re-ranks 50 x top_k candidates from disk; hnsw re-ranks 30 x top_k candidates
# (bench/ranker_kinds.py measures the recall each reaches).
KIND_DEFAULTS = {IVF_PQ: {"nprobe": 64, "rerank_factor": 50}, HNSW: {"rerank_factor": 30}}
_RANGES = (("hnsw_m", 4, 256), ("ef_construction", 8, 4096), ("ef_search", 1, 32768), ("nlist", 1, 1 << 20),
           ("nprobe", 1, 1 << 20), ("pq_bytes", 1, 1024), ("rerank_factor", 1, 1000))


def make_spec(kind: str = EXACT, *, what: str = "index options", **params) -> IndexSpec:
    """A checked spec; a parameter left 0/None takes its default."""
    kind = kind or EXACT
    if kind not in KINDS:
        raise errors.InvalidArgument(f"{what}: unknown index kind {kind!r}: use one of {', '.join(KINDS)}")
    unknown = set(params) - ({f.name for f in dataclasses.fields(IndexSpec)} - {"kind"})
    if unknown:
        raise errors.InvalidArgument(f"{what}: unknown index parameters {sorted(unknown)}")
    given = {k: v for k, v in params.items() if v not in (None, 0) or isinstance(v, bool)}
    given = {**KIND_DEFAULTS.get(kind, {}), **given}
    if kind != EXACT and given.get("float16"):
        raise errors.InvalidArgument(f"{what}: float16 applies to the exact kind only")
    spec = IndexSpec(kind=kind, **given)
    for name, low, high in _RANGES:
        value = getattr(spec, name)
        if not low <= value <= high:
            raise errors.InvalidArgument(f"{what}: {name} = {value} is out of range {low}..{high}")
    if spec.nprobe > spec.nlist:
        spec = dataclasses.replace(spec, nprobe=spec.nlist)
    return spec


def spec_from_json(kind: str, params: str) -> IndexSpec:
    return make_spec(kind, what="stored index options", **json.loads(params or "{}"))


def _alpha(alpha: float | None, default: float, what: str) -> float:
    if alpha is None:
        return default
    if not math.isfinite(alpha) or not 0 <= alpha <= 100:
        raise errors.InvalidArgument(f"{what}: alpha {alpha} is out of range 0..100")
    return float(alpha)


def make_expansion(top_n: int = 0, alpha: float | None = None, *, what: str = "query expansion") -> Expansion:
    """A checked Expansion (0 / None take the defaults)."""
    top_n = top_n or defaults.DEFAULT_QE_TOP_N
    if not 1 <= top_n <= defaults.MAX_RERANK_TOP_N:
        raise errors.InvalidArgument(f"{what}: top_n {top_n} is out of range 1..{defaults.MAX_RERANK_TOP_N} "
                                     f"(0 = {defaults.DEFAULT_QE_TOP_N})")
    return Expansion(top_n, _alpha(alpha, defaults.DEFAULT_QE_ALPHA, what))


def make_k_reciprocal(k1: int = 0, k2: int = 0, lam: float | None = None, shortlist: int = 0, *,
                      what: str = "k-reciprocal re-ranking") -> KReciprocal:
    k1 = k1 or defaults.DEFAULT_KR_K1
    if not 1 <= k1 <= defaults.MAX_KR_K1:
        raise errors.InvalidArgument(f"{what}: k1 {k1} is out of range 1..{defaults.MAX_KR_K1} "
                                     f"(0 = {defaults.DEFAULT_KR_K1})")
    k2 = k2 or min(defaults.DEFAULT_KR_K2, k1)
    if not 1 <= k2 <= k1:
        raise errors.InvalidArgument(f"{what}: k2 {k2} is out of range 1..k1 ({k1})")
    lam = defaults.DEFAULT_KR_LAMBDA if lam is None else float(lam)
    if not 0 <= lam <= 1:  # (NaN fails too)
        raise errors.InvalidArgument(f"{what}: lambda {lam} is out of range 0..1")
    shortlist = shortlist or defaults.DEFAULT_KR_SHORTLIST
    if not 1 <= shortlist <= defaults.MAX_TOP_K:
        raise errors.InvalidArgument(f"{what}: shortlist {shortlist} is out of range 1..{defaults.MAX_TOP_K} "
                                     f"(0 = {defaults.DEFAULT_KR_SHORTLIST})")
    return KReciprocal(k1, k2, lam, shortlist)


# ---------------------------------------------------------------- a request against its collection

def pending_item(index: int, item: UpsertItem) -> Pending:
    """An upsert item checked on its own (not yet against its collection)."""
    what = describe_item(index, item.name)
    check_collection(item.collection, what=what)
    check_name(item.name, what=what)
    return Pending(index, item.collection, item.name, stored_form(unit_vector(item.vector, what=what)),
                   item.fingerprint, check_attributes(item.attributes, what=what), what)


def check_fits(collection: str, dim: int, fingerprint: str, item: Pending) -> None:
    """An item against the dimension and fingerprint of its collection."""
    if item.vector.shape[0] != dim:
        raise errors.InvalidArgument(
            f"{item.what}: vector has {item.vector.shape[0]} values but collection {collection!r} has dimension {dim}")
    if item.fingerprint != fingerprint:
        raise errors.FailedPrecondition(
            f"{item.what}: fingerprint {item.fingerprint!r} differs from collection {collection!r}'s "
            f"{fingerprint!r}: vectors of another model (or preprocessing) cannot share a collection")


def check_query(query: Query, what: str) -> int:
    """A query's top_k (0 takes the default) and collection name, before its collection is looked up."""
    k = check_top_k(query.top_k, what=what)
    check_collection(query.collection, what=what)
    return k


def query_vector(query: Query, what: str, collection: str, dim: int, fingerprint: str) -> np.ndarray:
    """The float64 unit query vector, checked against its collection (FailedPrecondition for another model's)."""
    if query.fingerprint and query.fingerprint != fingerprint:
        raise errors.FailedPrecondition(
            f"{what}: fingerprint {query.fingerprint!r} differs from collection {collection!r}'s "
            f"{fingerprint!r}: the query vector comes from another model (or preprocessing)")
    return unit_vector(query.vector, what=what, dim=dim)


def unknown_collection(collection: str, known: Iterable[str]) -> errors.NotFound:
    known = sorted(known)
    listing = ", ".join(repr(c) for c in known[:10]) + (" ..." if len(known) > 10 else "")
    return errors.NotFound(f"unknown collection {collection!r} (known: {listing or 'none yet'})")


def check_new_collection(collection: str, dim: int, spec: IndexSpec, low: int = 1, high: int = MAX_DIM) -> None:
    """CreateCollection's own checks: the name, the dimension (`low`..`high`, the backend's limits), and
    ivf_pq's code size, which must divide it."""
    check_collection(collection, what="create collection")
    if not low <= dim <= high:
        raise errors.InvalidArgument(f"create collection {collection!r}: dimension {dim} is out of range "
                                     f"{low}..{high}")
    if spec.kind == IVF_PQ and dim % spec.pq_bytes:
        raise errors.InvalidArgument(f"create collection {collection!r}: ivf_pq needs pq_bytes ({spec.pq_bytes}) "
                                     f"to divide the dimension ({dim})")


def check_same_collection(collection: str, have: tuple[int, str, IndexSpec], want: tuple[int, str, IndexSpec]
                          ) -> None:
    """CreateCollection of a collection that exists: no error when its (dim, fingerprint, spec) are the
    ones asked for; AlreadyExists otherwise."""
    if have != want:
        (dim, fp, spec), (new_dim, new_fp, new_spec) = have, want
        raise errors.AlreadyExists(
            f"collection {collection!r} exists with dimension {dim}, fingerprint {fp!r} and index {spec.label} "
            f"{spec.params()}: not dimension {new_dim}, fingerprint {new_fp!r}, index {new_spec.label} "
            f"{new_spec.params()}; drop it first")


def check_list_items(collection: str, page_size: int, limit: int) -> int:
    """ListItems' collection name, page size and limit; the page size to use."""
    check_collection(collection, what="list items")
    if not 0 <= page_size <= defaults.MAX_LIST_PAGE:
        raise errors.InvalidArgument(f"list items: page_size {page_size} is out of range: "
                                     f"use 1..{defaults.MAX_LIST_PAGE} (0 = {defaults.DEFAULT_LIST_PAGE})")
    if limit < 0:
        raise errors.InvalidArgument(f"list items: limit {limit} is negative")
    return page_size or defaults.DEFAULT_LIST_PAGE


def check_renamings(collection: str, renamings: Sequence[tuple[str, str]], in_order: bool = False) -> None:
    """Names valid; unless `in_order` (applied one after another, like `mv`),
    no two renamings touch one name: a source and a target, a source twice or
    a target twice would make the outcome depend on the order."""
    check_collection(collection, what="rename")
    for i, (old, new) in enumerate(renamings):
        check_name(old, what=f"rename: renamings[{i}].from_name")
        check_name(new, what=f"rename: renamings[{i}].to_name")
    if in_order:
        return
    first: dict[str, int] = {}  # name -> the renaming that touched it first
    for i, pair in enumerate(renamings):
        for name in dict.fromkeys(pair):
            j = first.setdefault(name, i)
            if j != i:
                a, b = renamings[j]
                raise errors.InvalidArgument(
                    f"rename: renamings[{j}] ({shorten(a)!r} -> {shorten(b)!r}) and renamings[{i}] "
                    f"({shorten(pair[0])!r} -> {shorten(pair[1])!r}) both name {shorten(name)!r}: send them in "
                    "separate calls, or set in_order to apply them one after another like mv")


def check_delete(collection: str, names: Sequence[str]) -> None:
    """A name to delete may hold what a stored name cannot (it is then not found)."""
    check_collection(collection, what="delete")
    for i, name in enumerate(names):
        check_name(name, what=f"delete: names[{i}]", new=False)
