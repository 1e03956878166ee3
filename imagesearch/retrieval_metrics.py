"""Retrieval metrics, torch-free: the one definition the CLI's scoring
(clients.metrics), the trainer's per-epoch validation and the benchmarks use.

- AP@k: sum over ranks i <= k of precision@i at each relevant hit, divided by
  min(|relevant|, k), so a perfect top-k scores 1 even when more than k are
  relevant. mAP@k is its mean over queries.
- precision@k: relevant hits in the top k / k (a list shorter than k counts
  the missing places as misses).
- recall@k: relevant hits in the top k / |relevant|.
- top-1: 1 when the first result is relevant.

A name repeated in a ranking counts once (at its first place).
`leave_one_out` scores a labelled set of vectors as a retrieval task: each
vector a query against all the others, relevant = same label.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np


def _hits(ranked: Sequence[Hashable], relevant: set, k: int) -> list[bool]:
    seen: set = set()
    hits = []
    for name in ranked[:k]:
        hits.append(name in relevant and name not in seen)
        seen.add(name)
    return hits


def average_precision(ranked: Sequence[Hashable], relevant, k: int = 10) -> float:
    relevant = set(relevant)
    if not relevant:
        raise ValueError("average precision is undefined without relevant items")
    total, found = 0.0, 0
    for i, hit in enumerate(_hits(ranked, relevant, k), start=1):
        if hit:
            found += 1
            total += found / i
    return total / min(len(relevant), k)


def precision_at_k(ranked: Sequence[Hashable], relevant, k: int = 10) -> float:
    return sum(_hits(ranked, set(relevant), k)) / k


def recall_at_k(ranked: Sequence[Hashable], relevant, k: int = 10) -> float:
    relevant = set(relevant)
    if not relevant:
        raise ValueError("recall is undefined without relevant items")
    return sum(_hits(ranked, relevant, k)) / len(relevant)


def top1(ranked: Sequence[Hashable], relevant) -> float:
    return float(bool(ranked) and ranked[0] in set(relevant))


def top_k_others(vectors: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """(N, min(k, N-1)) indices of each row's nearest other rows by inner
    product (cosine for unit vectors), best first, ties broken by index."""
    x = np.asarray(vectors, dtype=np.float32)
    n = len(x)
    k = min(k, n - 1)
    out = np.empty((n, max(k, 0)), dtype=np.int64)
    if k <= 0:
        return out
    for start in range(0, n, chunk):
        sims = x[start:start + chunk] @ x.T
        rows = np.arange(len(sims))
        sims[rows, start + rows] = -np.inf  # never itself
        # Stable sort on the negated scores: equal scores keep index order.
        out[start:start + chunk] = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return out


def leave_one_out(vectors: np.ndarray, labels: Sequence[int], k: int = 10) -> dict:
    """Each vector a query against the others; relevant = the same label.
    Queries whose label no other vector shares are left out. Returns
    {"map", "precision", "top1", "queries"} (NaN figures when no query counts)."""
    labels = np.asarray(labels)
    if len(labels) != len(vectors):
        raise ValueError(f"{len(vectors)} vectors but {len(labels)} labels")
    neighbours = top_k_others(vectors, k)
    members: dict = {}
    for i, label in enumerate(labels.tolist()):
        members.setdefault(label, set()).add(i)
    aps, precisions, firsts = [], [], []
    for i, label in enumerate(labels.tolist()):
        relevant = members[label] - {i}
        if not relevant:
            continue
        ranked = neighbours[i].tolist()
        aps.append(average_precision(ranked, relevant, k))
        precisions.append(precision_at_k(ranked, relevant, k))
        firsts.append(top1(ranked, relevant))
    if not aps:
        return {"map": float("nan"), "precision": float("nan"), "top1": float("nan"), "queries": 0}
    return {"map": float(np.mean(aps)), "precision": float(np.mean(precisions)), "top1": float(np.mean(firsts)),
            "queries": len(aps)}
