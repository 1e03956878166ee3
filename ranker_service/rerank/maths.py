"""Re-ranking maths, numpy only (no gRPC, no SQLite, no index): the two
methods (docs/ranker.md#re-ranking gives the definitions; their options are
types.Expansion and types.KReciprocal, checked in validation.py):

- alpha-weighted query expansion (`expand_query`), per request;
- k-reciprocal re-ranking (`Neighbourhoods.build` at index time per collection
  generation, `Neighbourhoods.rerank` per query).

The gallery-to-gallery passes (`neighbours`) are one float32 product in row
chunks of about `DERIVED_CHUNK_SCORES` scores: memory bounded whatever the
gallery size, time O(G^2 d).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from imagesearch import defaults
from ranker_service.topk import exact_scores, score_margin, select_top_k
from ranker_service.types import KReciprocal

# ---------------------------------------------------------------- gallery-to-gallery neighbours

Step = Callable[[], None] | None  # called between chunks of a long pass (a background job's cancel and pause)


def neighbours(matrix32: np.ndarray, count: int, names: Sequence[str],
               chunk_scores: int = defaults.DERIVED_CHUNK_SCORES, step: Step = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest rows: (ids (n, m) int64, similarities (n, m) float32)
    with m = min(count + 1, n): the row itself first (similarity 1), then its
    `count` nearest other rows by float32 cosine, best first, equal scores by
    name. One (chunk x n) product at a time, `step()` after each."""
    n = matrix32.shape[0]
    m = min(count + 1, n)
    ids = np.empty((n, m), dtype=np.int64)
    sims = np.empty((n, m), dtype=np.float32)
    if n == 0:
        return ids, sims
    name_rank = np.empty(n, dtype=np.int64)
    name_rank[sorted(range(n), key=names.__getitem__)] = np.arange(n)
    rows = max(1, chunk_scores // n)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        scores = matrix32[start:stop] @ matrix32.T
        local = np.arange(stop - start)
        scores[local, local + start] = np.inf  # the row itself first
        if m < n:
            cand = np.argpartition(-scores, m - 1, axis=1)[:, :m]
        else:
            cand = np.broadcast_to(np.arange(n), (stop - start, n))
        cand_scores = np.take_along_axis(scores, cand, axis=1)
        order = np.lexsort((name_rank[cand], -cand_scores), axis=1)
        ids[start:stop] = np.take_along_axis(cand, order, axis=1)
        sims[start:stop] = np.take_along_axis(cand_scores, order, axis=1)
        if step is not None:
            step()
    sims[:, 0] = 1.0
    return ids, sims


# ---------------------------------------------------------------- query expansion

def expand_query(query64: np.ndarray, vectors: np.ndarray, scores: Sequence[float], alpha: float) -> np.ndarray:
    """normalise(q + sum_i max(s_i, 0)^alpha g_i) in float64 (q itself when that is zero)."""
    if len(scores) == 0:
        return query64
    weights = np.maximum(np.asarray(scores, dtype=np.float64), 0.0) ** alpha
    out = query64 + weights @ np.asarray(vectors, dtype=np.float64)
    norm = np.linalg.norm(out)
    return out / norm if norm > 0 and np.isfinite(norm) else query64


# ---------------------------------------------------------------- k-reciprocal re-ranking

def _expanded(r: set[int], half: list[set[int]]) -> set[int]:
    """R*(p) = R(p, k1) plus R(c, k1/2) of each c in it sharing over 2/3 of its items with R(p, k1)."""
    out = set(r)
    for c in r:
        rc = half[c]
        if len(rc & r) > 2 / 3 * len(rc):
            out |= rc
    return out


def _reciprocal(ids: np.ndarray, k: int) -> list[set[int]]:
    """R(g, k) = {y in N(g, k) : g in N(y, k)}, N(g, k) = ids[g, :k + 1] (g itself and its k nearest)."""
    near = ids[:, : k + 1]
    n = ids.shape[0]
    out = []
    for start in range(0, n, 4096):
        block = near[start:start + 4096]
        back = (near[block] == np.arange(start, start + block.shape[0])[:, None, None]).any(axis=2)
        out.extend(set(row[mask].tolist()) for row, mask in zip(block, back))
    return out


@dataclasses.dataclass
class Neighbourhoods:
    """A collection's gallery-to-gallery k-reciprocal data (for one k1, k2)
    over a snapshot of its vectors."""

    matrix: np.ndarray            # (n, dim) float32 vectors
    names: list[str]
    rows: dict[str, int]          # name -> row
    ids: np.ndarray               # (n, m) nearest rows, the row itself first
    tau: np.ndarray               # (n,) similarity of each row's k1-th nearest other row (-inf: fewer exist)
    half: list[set[int]]          # R(g, round(k1 / 2))
    v_ptr: np.ndarray             # V rows as CSR: row g is v_cols/v_vals[v_ptr[g]:v_ptr[g + 1]]
    v_cols: np.ndarray
    v_vals: np.ndarray
    k1: int
    k2: int

    @classmethod
    def build(cls, matrix32: np.ndarray, names: Sequence[str], k1: int, k2: int,
              chunk_scores: int = defaults.DERIVED_CHUNK_SCORES, *, step: Step = None) -> Neighbourhoods:
        names = list(names)
        n = matrix32.shape[0]
        ids, sims = neighbours(matrix32, max(k1, k2 - 1), names, chunk_scores, step)
        tau = np.full(n, -np.inf, dtype=np.float64)
        if ids.shape[1] > k1:
            tau = sims[:, k1].astype(np.float64)
        full = _reciprocal(ids, k1)
        half = _reciprocal(ids, half_k(k1))
        ptr = np.zeros(n + 1, dtype=np.int64)
        cols, vals = [], []
        for g in range(n):
            support = np.fromiter(sorted(_expanded(full[g], half)), dtype=np.int64)
            weights = np.exp(exact_scores(matrix32[support], matrix32[g].astype(np.float64)) - 1.0)
            cols.append(support)
            vals.append(weights / weights.sum())
            ptr[g + 1] = ptr[g] + support.shape[0]
            if step is not None and g % 4096 == 4095:
                step()
        return cls(matrix32, names, {name: i for i, name in enumerate(names)}, ids, tau, half, ptr,
                   np.concatenate(cols) if cols else np.empty(0, np.int64),
                   np.concatenate(vals) if vals else np.empty(0), k1, k2)

    ARRAYS = ("ids", "tau", "v_ptr", "v_cols", "v_vals")  # what a file keeps (sqlite/snapshots.py)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays `from_arrays` rebuilds it from, beside the matrix and names."""
        return {name: getattr(self, name) for name in self.ARRAYS}

    @classmethod
    def from_arrays(cls, matrix32: np.ndarray, names: Sequence[str], arrays: dict, k1: int, k2: int
                    ) -> Neighbourhoods:
        """Neighbourhoods as `arrays()` gave them, over the same rows (`names`, in
        that order, and their vectors); ValueError when the arrays do not fit them."""
        names = list(names)
        n = len(names)
        ids, tau, ptr, cols, vals = (np.asarray(arrays[name]) for name in cls.ARRAYS)
        if (matrix32.shape[0] != n or ids.ndim != 2 or ids.shape[0] != n or tau.shape != (n,)
                or ptr.shape != (n + 1,) or cols.shape != vals.shape or (n and ptr[-1] != cols.shape[0])
                or (ids.size and not (0 <= ids.min() and ids.max() < n))
                or (cols.size and not (0 <= cols.min() and cols.max() < n))):
            raise ValueError(f"k-reciprocal arrays do not fit {n} rows")
        return cls(matrix32, names, {name: i for i, name in enumerate(names)}, ids, tau, _reciprocal(ids, half_k(k1)),
                   ptr, cols, vals, k1, k2)

    @property
    def nbytes(self) -> int:
        """Memory held, its copy of the vectors included (an estimate for the Python sets)."""
        return (self.ids.nbytes + self.tau.nbytes + self.v_ptr.nbytes + self.v_cols.nbytes + self.v_vals.nbytes
                + sum(64 + 28 * len(h) for h in self.half) + self.matrix.nbytes)

    def _v(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.v_ptr[g], self.v_ptr[g + 1]
        return self.v_cols[lo:hi], self.v_vals[lo:hi]

    def rerank(self, query64: np.ndarray, k: int, options: KReciprocal,
               allowed: set[str] | None = None) -> list[tuple[str, float]]:
        """[(name, score)] best first (ties by name), at most k, from the
        shortlist: the top max(shortlist, k) by cosine among `allowed` (all
        when None). N(q, k1) is over the whole gallery."""
        n = self.matrix.shape[0]
        if n == 0 or k <= 0:
            return []
        margin = score_margin(self.matrix.shape[1])
        scores32 = self.matrix @ query64.astype(np.float32)
        nearest = [self.rows[name] for name, _ in
                   select_top_k(scores32, self.matrix, self.names, query64, max(self.k1, self.k2 - 1), margin)]
        want = max(options.shortlist, k)
        if allowed is None:
            short = select_top_k(scores32, self.matrix, self.names, query64, want, margin)
        else:
            picked = np.fromiter(sorted(self.rows[a] for a in allowed if a in self.rows), dtype=np.int64)
            if picked.size == 0:
                return []
            short = select_top_k(scores32[picked], self.matrix[picked], [self.names[i] for i in picked], query64,
                                 want, margin)
        # the query's k-reciprocal set: g in N(q, k1) with q in N(g, k1)
        top = nearest[: self.k1]
        s_top = exact_scores(self.matrix[top], query64) if top else np.empty(0)
        r = {g for g, s in zip(top, s_top) if s >= self.tau[g]}
        support = np.fromiter(sorted(_expanded(r, self.half)), dtype=np.int64)
        vq = np.zeros(n)
        if support.size:
            weights = np.exp(exact_scores(self.matrix[support], query64) - 1.0)
            vq[support] = weights / weights.sum()
        expansion = nearest[: self.k2 - 1]
        for g in expansion:
            cols, vals = self._v(g)
            vq[cols] += vals
        vq /= 1 + len(expansion)
        vq_sum = vq.sum()
        lam = options.lam
        out = []
        for name, cosine in short:
            g = self.rows[name]
            parts = [self._v(int(j)) for j in self.ids[g, : self.k2]]
            cols = np.concatenate([c for c, _ in parts])
            vals = np.concatenate([v for _, v in parts]) / len(parts)
            uniq, inverse = np.unique(cols, return_inverse=True)
            vg = np.bincount(inverse, weights=vals, minlength=uniq.shape[0])
            low = np.minimum(vq[uniq], vg).sum()
            high = vq_sum + vg.sum() - low
            jaccard = 1.0 - (low / high if high > 0 else 0.0)
            out.append((name, lam * cosine + (1 - lam) * (1 - jaccard)))
        out.sort(key=lambda t: (-t[1], t[0]))
        return out[:k]


def half_k(k1: int) -> int:
    """round(k1 / 2), at least 1 (the paper's expansion neighbourhood)."""
    return max(1, int(np.around(k1 / 2)))
