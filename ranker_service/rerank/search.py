"""A re-ranked search of one in-memory collection: alpha-weighted query
expansion (a first pass, the query moved towards its top matches, searched
again) and k-reciprocal re-ranking of the shortlist from the collection's
neighbourhoods (cache.py). Filters apply to every pass.
"""

from __future__ import annotations

import numpy as np

from ranker_service.memory.collection import Collection, Found
from ranker_service.memory.filtering import filtered_search
from ranker_service.rerank.cache import DerivedData, Key
from ranker_service.rerank.maths import expand_query
from ranker_service.types import Query


def needs(query: Query) -> list[Key]:
    """The derived data a query needs: the k-reciprocal neighbourhoods of its (k1, k2)."""
    options = query.k_reciprocal
    return [] if options is None else [(options.k1, options.k2)]


def reranked_search(coll: Collection, q64: np.ndarray, k: int, query: Query, cache: DerivedData,
                    allowed: set[str] | None) -> Found:
    """`query`'s top-k, its vector `q64` checked already; waits for derived data being rebuilt until
    the query's deadline (never builds it)."""
    derived = cache.get(coll.name, needs(query), query.deadline)

    def first_pass(vector: np.ndarray, kk: int) -> Found:
        if allowed is not None:
            return filtered_search(coll, vector, kk, allowed)
        (found,) = coll.search(vector[np.newaxis], [kk])
        return found

    if query.expansion is not None:
        top, vectors = [], []
        for name, score in first_pass(q64, query.expansion.top_n):
            try:
                vectors.append(coll.vector(name))
            except KeyError:  # deleted since the first pass
                continue
            top.append(score)
        if top:
            q64 = expand_query(q64, np.stack(vectors), top, query.expansion.alpha)
    options = query.k_reciprocal
    if options is None:
        return first_pass(q64, k)
    return derived[(options.k1, options.k2)].rerank(q64, k, options, allowed)
