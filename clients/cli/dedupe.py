"""Near-duplicate groups of a collection: every pair of items whose cosine
similarity is at least a threshold, joined into connected components.

The vectors come from ListItems (stored unit vectors); the pairs from a
blocked product of the matrix with itself (`BLOCK` rows at a time, so
memory stays at BLOCK x n scores), upper triangle only; the components from
a union-find over the pairs."""

from __future__ import annotations

import dataclasses

import numpy as np

from clients.types import Match

BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class Group:
    names: list[str]                           # sorted
    pairs: list[tuple[str, str, float]]        # (a, b, cosine) at or above the threshold, a < b

    def as_dict(self) -> dict:
        return {"names": self.names, "pairs": [[a, b, round(s, 6)] for a, b, s in self.pairs]}


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def near_duplicate_groups(names: list[str], vectors: np.ndarray, threshold: float) -> list[Group]:
    """Groups of at least two items, largest first (then by first name)."""
    n = len(names)
    if n < 2:
        return []
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    parent = list(range(n))
    pairs: list[tuple[int, int, float]] = []
    for start in range(0, n, BLOCK):
        block = v[start:start + BLOCK] @ v.T  # (b, n)
        rows, cols = np.nonzero(block >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i = start + r
            if c <= i:
                continue
            pairs.append((i, c, float(block[r, c])))
            a, b = _find(parent, i), _find(parent, c)
            if a != b:
                parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for x in sorted({x for i, j, _ in pairs for x in (i, j)}):
        members.setdefault(_find(parent, x), []).append(x)
    by_root: dict[int, list[tuple[str, str, float]]] = {}
    for i, j, s in pairs:
        a, b = sorted((names[i], names[j]))
        by_root.setdefault(_find(parent, i), []).append((a, b, s))
    groups = [Group(sorted(names[x] for x in xs), sorted(by_root[root], key=lambda p: (-p[2], p[0], p[1])))
              for root, xs in members.items()]
    return sorted(groups, key=lambda g: (-len(g.names), g.names[0]))


def as_report_rows(groups: list[Group], names: list[str], vectors: np.ndarray) -> list[tuple[str, list[Match]]]:
    """For the HTML report: each group as a row, its first item in the query's
    place and the others with their similarity to it."""
    row_of = {name: i for i, name in enumerate(names)}
    rows = []
    for g in groups:
        first = vectors[row_of[g.names[0]]]
        others = [(float(vectors[row_of[m]] @ first), m) for m in g.names[1:]]
        others.sort(key=lambda t: (-t[0], t[1]))
        rows.append((g.names[0], [Match(rank, m, s) for rank, (s, m) in enumerate(others, 1)]))
    return rows
