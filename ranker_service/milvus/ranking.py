"""`rank_rows`: the exact float64 top-k, ties by name, of rows read back
from Milvus (its float32 scores only choose the candidates)."""

from __future__ import annotations

import numpy as np

from ranker_service.topk import rank_exact
from ranker_service.types import Match, Query


def rank_rows(rows: list[dict], q64: np.ndarray, k: int, query: Query | None) -> list[Match]:
    """The exact float64 top-k of rows {name, vector[, attributes]}, ties by name."""
    if not rows:
        return []
    by_name = {r["name"]: r for r in rows}
    found = rank_exact(list(by_name), np.asarray([r["vector"] for r in by_name.values()], dtype=np.float32),
                       q64, k)
    with_attributes = query is not None and query.with_attributes
    return [Match(rank, name, score, dict(by_name[name].get("attributes") or {}) if with_attributes else {})
            for rank, (name, score) in enumerate(found, 1)]
