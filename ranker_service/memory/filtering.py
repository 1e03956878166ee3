"""A filtered search: top-k among the items that pass a query's attribute
filters, on any index kind. Filters apply before top-k: whenever k items
pass, k come back.

- `exact` kinds: an exact scan of just the passing rows (`search_among`):
  its cost is that of the passing rows, never more than the kind's own full
  scan.
- ANN kinds: when at most `FILTER_EXACT_SCAN_SHARE` of the collection
  passes, the same exact scan of the passing rows (the share measured in
  bench/filters.py); above it, the ANN search among the passing items only
  (`search_filtered`: FAISS skips every other id while it searches). When
  fewer than k come back, the exact scan of the passing rows answers
  instead. So an ANN kind never returns fewer than min(k, passing) matches.
"""

from __future__ import annotations

from collections.abc import Collection as Sized

import numpy as np

from imagesearch.defaults import FILTER_EXACT_SCAN_SHARE
from ranker_service.memory.collection import Collection, Found
from ranker_service.types import EXACT


def filtered_search(coll: Collection, query64: np.ndarray, k: int, allowed: Sized[str]) -> Found:
    """[(name, score)] best first: the top-k of `coll` among `allowed` names."""
    n, m = len(coll), len(allowed)
    if m == 0 or n == 0:
        return []
    if coll.spec.kind != EXACT and m > FILTER_EXACT_SCAN_SHARE * n:
        hits = coll.search_filtered(query64, k, allowed)
        if hits is not None and len(hits) >= min(k, m):
            return hits
    return coll.search_among(query64, k, allowed)
