"""What the ranker's re-ranking costs (docs/ranker.md#re-ranking), in process.

    python bench/rerank_cost.py [--n 10000] [--dim 1280] [--queries 50]

On clustered random unit vectors (30 per cluster): the time to derive the
k-reciprocal neighbourhoods (k1 20, k2 6) of n items (the G x G pass rebuilt in the background after a write), their memory, and the
per-query time of a k-reciprocal search against the bare float32 product +
argpartition over the same matrix.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ranker_service.rerank.maths import Neighbourhoods  # noqa: E402
from ranker_service.validation import make_k_reciprocal  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--queries", type=int, default=50)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.n // 30 + 1, args.dim))
    matrix = (np.repeat(centres, 30, axis=0)[: args.n] + 0.8 * rng.standard_normal((args.n, args.dim)))
    matrix = (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)
    names = [f"{i:08d}" for i in range(args.n)]
    t = time.perf_counter()
    nb = Neighbourhoods.build(matrix, names, 20, 6)
    kr_s = time.perf_counter() - t
    options = make_k_reciprocal()
    queries = matrix[: args.queries].astype(np.float64) + 0.05 * rng.standard_normal((args.queries, args.dim))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    t = time.perf_counter()
    for q in queries:
        nb.rerank(q, 10, options)
    kr_q = (time.perf_counter() - t) / args.queries
    t = time.perf_counter()
    for q in queries:
        np.argpartition(-(matrix @ q.astype(np.float32)), 10)[:10]
    plain_q = (time.perf_counter() - t) / args.queries
    print(f"n {args.n}, dim {args.dim} ({matrix.nbytes / 1e6:.0f} MB of vectors): k-reciprocal "
          f"neighbourhoods {kr_s:.1f} s ({nb.nbytes / 1e6:.1f} MB with its copy of the vectors); per query: k-reciprocal "
          f"{kr_q * 1e3:.1f} ms, bare product + argpartition {plain_q * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
