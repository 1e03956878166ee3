"""Filtered search on an ANN collection: where the exact scan of the passing
rows stops being cheaper than the ANN search with over-fetch. The crossover
sets `imagesearch.defaults.FILTER_EXACT_SCAN_SHARE`.

    .venv/bin/python -m bench.filters                  # 20k x 1280, hnsw and ivf_pq
    .venv/bin/python -m bench.filters --n 100000 --kinds hnsw

In the ranker's core (no gRPC), per kind, on random unit vectors with an
attribute that a given share of the items pass, for each share: the median
time of (a) `exact_among` (an exact float32 product over the passing rows
and the exact float64 top-k), (b) `ann_then_filter` (the kind's own search
for k x 1/share x FILTER_OVERFETCH candidates, re-ranked exactly, then
filtered) and (c) `search_filtered` (FAISS searching with a selector of the
passing ids, then the exact re-rank: what the ranker uses above the share);
for (b) and (c) the recall@k against the exact filtered top-k and "short",
the queries answered with fewer than k (which then cost (a) as well). Plus
the unfiltered search of the kind, for scale.

Prints a table and writes bench/results/filters.json.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from imagesearch.defaults import FILTER_EXACT_SCAN_SHARE

FILTER_OVERFETCH = 2.0  # candidates fetched per match wanted, times 1 / share (the strategy measured here)
from testkit import unit32
from ranker_service.memory.registry import make_collection
from ranker_service.validation import make_spec

ROOT = Path(__file__).resolve().parents[1]
SHARES = (0.002, 0.01, 0.03, 0.1, 0.3, 0.5)
K = 10


def exact_among(coll, query64, k, allowed):
    """(a): the exact top-k over the passing rows (what the ranker does below the share)."""
    return coll.search_among(query64, k, allowed)


def ann_then_filter(coll, query64, k, allowed, overfetch=FILTER_OVERFETCH):
    """(b): the ANN search over-fetching k / share x `overfetch` candidates, those
    that pass kept; None when fewer than min(k, passing) pass."""
    n, m = len(coll), len(allowed)
    fetch = min(n, math.ceil(k * (n / m) * overfetch))
    (found,) = coll.search(query64[np.newaxis], [fetch])
    hits = [(name, score) for name, score in found if name in allowed][:k]
    return hits if len(hits) >= min(k, m) else None


def median_ms(fn, queries) -> float:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--queries", type=int, default=30)
    p.add_argument("--kinds", default="hnsw,ivf_pq")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    vectors = unit32(rng.standard_normal((args.n, args.dim)))
    names = [f"{i:07d}" for i in range(args.n)]
    order = rng.permutation(args.n)
    queries = [q / np.linalg.norm(q) for q in rng.standard_normal((args.queries, args.dim))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            params = {"nlist": 128, "nprobe": 16, "pq_bytes": 64} if kind == "ivf_pq" else {}
            coll = make_collection("bench", args.dim, "", make_spec(kind, **params), files_dir=Path(tmp))
            t0 = time.perf_counter()
            coll.upsert(names, vectors)
            build = time.perf_counter() - t0
            plain = median_ms(lambda q, c=coll: c.search(q[np.newaxis], [K]), queries)
            everyone = set(names)
            plain_recall = statistics.mean(
                len({n for n, _ in coll.search(q[np.newaxis], [K])[0]} & {n for n, _ in exact_among(coll, q, K, everyone)})
                / K for q in queries)
            rows.append({"kind": kind, "share": 1.0, "exact_ms": None, "ann_ms": plain, "ann_recall": plain_recall,
                         "build_s": build})
            for share in SHARES:
                allowed = {names[i] for i in order[: max(1, int(share * args.n))]}
                exact = median_ms(lambda q, c=coll, a=allowed: exact_among(c, q, K, a), queries)
                row = {"kind": kind, "share": share, "exact_ms": exact}
                for key, fn in (("ann", ann_then_filter), ("sel", lambda c, q, k, a: c.search_filtered(q, k, a))):
                    short, recall = 0, []
                    for q in queries:
                        got = fn(coll, q, K, allowed)
                        if got is None or len(got) < min(K, len(allowed)):
                            short += 1
                            continue
                        want = {n for n, _ in exact_among(coll, q, K, allowed)}
                        recall.append(len(want & {n for n, _ in got}) / len(want))
                    row[f"{key}_ms"] = median_ms(lambda q, c=coll, a=allowed, f=fn: f(c, q, K, a), queries)
                    row[f"{key}_recall"] = statistics.mean(recall) if recall else None
                    row[f"{key}_short"] = short
                rows.append(row)
            coll.close()
    print(f"n={args.n} dim={args.dim} k={K}, {args.queries} queries, one BLAS thread; "
          f"FILTER_EXACT_SCAN_SHARE = {FILTER_EXACT_SCAN_SHARE}")
    print("| kind | passing share | (a) exact scan, ms | (b) ANN + over-fetch, ms | (b) recall@10 | (b) short | "
          "(c) ANN + selector, ms | (c) recall@10 | (c) short |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")

    def rec(x):
        return "" if x is None else f"{x:.3f}"

    for r in rows:
        if r["exact_ms"] is None:
            print(f"| {r['kind']} | unfiltered | | {r['ann_ms']:.2f} | {rec(r['ann_recall'])} | | | | |")
            continue
        print(f"| {r['kind']} | {r['share']:.3f} | {r['exact_ms']:.2f} | {r['ann_ms']:.2f} | {rec(r['ann_recall'])} | "
              f"{r['ann_short']}/{args.queries} | {r['sel_ms']:.2f} | {rec(r['sel_recall'])} | "
              f"{r['sel_short']}/{args.queries} |")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "filters.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
