"""A filtered search: top-k among the items that pass a query's attribute
filters, on any index kind. Filters apply before top-k: whenever k items
pass, k come back.

- Exact kinds (anything that can scan a subset of its rows, `search_among`
  with `exact = True`, or no `spec` at all): an exact scan of just the
  passing rows: its cost is that of the passing rows, never more than the
  kind's own full scan.
- Approximate kinds (`spec.kind` not `exact`): when at most
  `FILTER_EXACT_SCAN_SHARE` of the collection passes, the same exact scan of
  the passing rows (the share measured in bench/filters.py); above it, the
  ANN search among the passing items only: FAISS kinds (`search_filtered`)
  give the index a selector of the passing ids, so it skips the others while
  it searches; a kind without one over-fetches k / share x
  `FILTER_OVERFETCH` candidates and keeps those that pass. When fewer than k
  come back, the exact scan of the passing rows answers instead. So an ANN
  kind never returns fewer than min(k, passing) matches.

A collection without `search_among` (a kind that cannot pick rows) is
scanned from its `vector(name)` copies.
"""

from __future__ import annotations

import math
from collections.abc import Collection as Sized

import numpy as np

from imagesearch.defaults import FILTER_EXACT_SCAN_SHARE, FILTER_OVERFETCH
from ranker_service.ranking import exact_scores


def is_exact(coll) -> bool:
    spec = getattr(coll, "spec", None)
    return spec is None or getattr(spec, "kind", "exact") == "exact"


def exact_among(coll, query64: np.ndarray, k: int, allowed: Sized[str]) -> list[tuple[str, float]]:
    """The exact top-k over the rows of `allowed` (ties by name)."""
    search_among = getattr(coll, "search_among", None)
    if search_among is not None:
        return search_among(query64, k, allowed)
    names, rows = [], []
    for name in allowed:
        try:
            rows.append(coll.vector(name))
        except KeyError:
            continue
        names.append(name)
    if not names:
        return []
    scores = exact_scores(np.stack(rows), query64)
    order = sorted(range(len(names)), key=lambda i: (-scores[i], names[i]))[:k]
    return [(names[i], float(scores[i])) for i in order]


def filtered_search(coll, query64: np.ndarray, k: int, allowed: Sized[str]) -> list[tuple[str, float]]:
    """[(name, score)] best first: the top-k of `coll` among `allowed` names."""
    n, m = len(coll), len(allowed)
    if m == 0 or n == 0:
        return []
    if is_exact(coll) or m <= FILTER_EXACT_SCAN_SHARE * n:
        return exact_among(coll, query64, k, allowed)
    search_filtered = getattr(coll, "search_filtered", None)
    if search_filtered is not None:  # FAISS kinds: the index skips the other ids itself
        hits = search_filtered(query64, k, allowed)
        if hits is not None and len(hits) < min(k, m):
            hits = None
    else:
        hits = ann_then_filter(coll, query64, k, allowed)
    return hits if hits is not None else exact_among(coll, query64, k, allowed)


def ann_then_filter(coll, query64: np.ndarray, k: int, allowed: Sized[str],
                    overfetch: float = FILTER_OVERFETCH) -> list[tuple[str, float]] | None:
    """The ANN search over-fetching k / share x `overfetch` candidates, those
    that pass kept; None when fewer than min(k, passing) pass."""
    n, m = len(coll), len(allowed)
    fetch = min(n, math.ceil(k * (n / m) * overfetch))
    (found,) = coll.search(query64[np.newaxis], [fetch])
    hits = [(name, score) for name, score in found if name in allowed][:k]
    return hits if len(hits) >= min(k, m) else None
