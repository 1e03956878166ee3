"""Input rules of the ranker: names, collection names, top_k and vectors.

Every check raises `imagesearch.errors.InvalidArgument` with a message that
names the offending input (`what`, e.g. "item 3 (name 'a.jpg')" or
"query 'q7'"), so callers only add where the input came from.

Vectors are normalised here, in float64, and stored as float32: the stored
form of a vector `v` is exactly `(v / np.linalg.norm(v)).astype(np.float32)`
with `v` taken as float64 (every float32 is exact in float64, and the norm of
float32 values can neither overflow nor underflow in float64).
"""

from __future__ import annotations

import unicodedata
from typing import Sequence

import numpy as np

from imagesearch import errors
from imagesearch.defaults import DEFAULT_TOP_K, MAX_TOP_K
from imagesearch.errors import shorten

MAX_DIM = 65536
MAX_COLLECTION_CHARS = 128
MAX_NAME_CHARS = 4096

STORED_DTYPE = np.dtype("<f4")  # float32 little-endian: the BLOB layout


def _has_control_chars(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def check_collection(collection: str, *, what: str = "request") -> str:
    """A collection name: 1..128 characters, no control characters, not blank."""
    if not collection:
        raise errors.InvalidArgument(f"{what}: empty collection name: say which collection to use")
    if len(collection) > MAX_COLLECTION_CHARS:
        raise errors.InvalidArgument(
            f"{what}: collection name {collection[:40]!r}... has {len(collection)} characters; "
            f"at most {MAX_COLLECTION_CHARS} are allowed")
    if not collection.strip():
        raise errors.InvalidArgument(f"{what}: collection name {collection!r} is blank")
    if _has_control_chars(collection):
        raise errors.InvalidArgument(f"{what}: collection name {collection!r} contains control characters")
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


def to_blob(vector32: np.ndarray) -> bytes:
    """float32 little-endian bytes of a stored vector."""
    return np.ascontiguousarray(vector32, dtype=STORED_DTYPE).tobytes()


def from_blob(blob: bytes, dim: int) -> np.ndarray:
    """A read-only float32 view of a stored BLOB (ValueError if its length is wrong)."""
    if len(blob) != dim * STORED_DTYPE.itemsize:
        raise ValueError(f"a {dim}-d vector takes {dim * STORED_DTYPE.itemsize} bytes, this BLOB has {len(blob)}")
    return np.frombuffer(blob, dtype=STORED_DTYPE)
