"""Top-k selection: one float32 BLAS product, then an exact float64 tie-break.

The ranking the ranker promises is the one a float64 numpy reference gives
over the stored float32 unit vectors: sort by the float64 dot product with the
float64-normalised query, best first, equal scores by name. A float32 product
is about twice as fast (half the memory traffic) but rounds; two items whose
float64 scores differ by less than the rounding could swap places.

So the float32 scores are only used to pick candidates: every item whose
float32 score is within `margin` of the k-th best float32 score. With
|s32 - s64| <= delta for every item (delta from the classic bound on a
d-term dot product: (d + 2) * 2**-24 for unit vectors, whatever the summation
order a BLAS picks), margin = 2 * delta provably contains the float64 top-k,
including every item tied with the k-th at the boundary. The candidates (about
k of them for real data) are rescored in float64, row by row with one
summation order per row (identical rows give identical scores), and sorted by
(-score, name).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

UNIT_ROUNDOFF_F32 = 2.0 ** -24


def score_margin(dim: int) -> float:
    """2 * delta: see the module docstring (1.01 covers |stored row| = 1 +- 2**-24 * sqrt(dim))."""
    gamma = (dim + 2) * UNIT_ROUNDOFF_F32
    return 2.0 * (1.01 * gamma / (1.0 - gamma) + 1e-12)


def candidates(scores32: np.ndarray, k: int, margin: float) -> np.ndarray:
    """Row indices that may belong to the float64 top-k (all rows when k >= n)."""
    n = scores32.shape[0]
    if k >= n:
        return np.arange(n)
    kth = np.partition(scores32, n - k)[n - k]  # the k-th largest float32 score
    return np.flatnonzero(scores32 >= kth - np.float32(margin))


def exact_scores(rows32: np.ndarray, query64: np.ndarray) -> np.ndarray:
    """float64 dot products, one fixed summation order per row."""
    return (rows32.astype(np.float64) * query64).sum(axis=1)


def select_top_k(scores32: np.ndarray, matrix32: np.ndarray, names: Sequence[str], query64: np.ndarray,
                 k: int, margin: float) -> list[tuple[str, float]]:
    """[(name, float64 score)] best first, ties by name, at most k.

    `scores32[i]` is the float32 score of `matrix32[i]`, whose name is `names[i]`."""
    n = scores32.shape[0]
    k = min(k, n)
    if k <= 0:
        return []
    cand = candidates(scores32, k, margin)
    exact = exact_scores(matrix32[cand], query64)
    if cand.shape[0] > k:
        # Keep everything tied with the k-th best float64 score, then sort those.
        kth = np.partition(exact, cand.shape[0] - k)[cand.shape[0] - k]
        keep = np.flatnonzero(exact >= kth)
        cand, exact = cand[keep], exact[keep]
    order = sorted(range(cand.shape[0]), key=lambda j: (-exact[j], names[cand[j]]))[:k]
    return [(names[cand[j]], float(exact[j])) for j in order]



def rank_exact(names: Sequence[str], rows32: np.ndarray, query64: np.ndarray, k: int) -> list[tuple[str, float]]:
    """[(name, float64 score)] best first, ties by name, at most k, every row scored exactly."""
    scores = exact_scores(rows32, query64)
    order = sorted(range(len(names)), key=lambda j: (-scores[j], names[j]))[:k]
    return [(names[j], float(scores[j])) for j in order]
