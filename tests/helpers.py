"""Plain helpers the tests share (fixtures live in conftest.py).

- `unit32`: the stored form the ranker promises: float64 normalisation, then float32.
- `reference_ranking`: the float64 numpy top-k every ranking is checked against.
"""

from __future__ import annotations

import numpy as np


def unit32(v) -> np.ndarray:
    """Rows (or one vector) normalised in float64, returned as float32."""
    v = np.asarray(v, dtype=np.float64)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def reference_ranking(stored32, names, query, k: int, *, rowwise: bool = False) -> tuple[list[str], list[float]]:
    """Top-k by float64 cosine over the stored float32 rows: the full product,
    a full sort by (-score, name). `rowwise` scores row by row instead of one
    matrix product (no BLAS blocking can hide in it)."""
    q = np.asarray(query, dtype=np.float64)
    q = q / np.linalg.norm(q)
    m64 = np.asarray(stored32, dtype=np.float64)
    scores = (m64 * q).sum(axis=1) if rowwise else m64 @ q
    order = sorted(range(len(names)), key=lambda i: (-scores[i], names[i]))[:k]
    return [names[i] for i in order], [float(scores[i]) for i in order]
