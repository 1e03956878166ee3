"""A restart of a collection with derived re-ranking data: read back from disk against rebuilt.

    python bench/derived_restart.py [--n 10000] [--dim 512] [--rounds 2]

A real ranker process over a temporary SQLite file holds one exact collection
of `--n` clustered random unit vectors, searched with k-reciprocal re-ranking
(k1 20, k2 6). After a clean stop (which writes the derived data next to the
index files, ranker_service/sqlite/snapshots.py) the ranker is started again,
in turn with those files ("saved") and with them removed ("rebuilt": the
O(G^2) derivation runs when the first search asks). Per start: seconds from the process start
to health SERVING and to the first answered search that needs the data, side
by side over `--rounds` rounds, and the median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clients.ranker import RankerClient  # noqa: E402
from clients.cli.services import RANKER_MODULE, Services  # noqa: E402
from clients.types import KReciprocal  # noqa: E402

COLLECTION = "gallery"
FILES = "*.kr-*"  # what a clean stop writes (sqlite/snapshots.py)


def search(ranker: RankerClient, query: np.ndarray) -> list[str]:
    """The top 10 of a search that needs the derived data."""
    return [m.name for m in ranker.search(COLLECTION, query, top_k=10, k_reciprocal=KReciprocal())]


def start(services: Services, db: Path, query: np.ndarray) -> tuple[object, float, float, list]:
    """(child, seconds to SERVING, seconds to the first search that needs the data answered, its names)."""
    t0 = time.perf_counter()
    child = services.start("ranker", RANKER_MODULE, ["--db", str(db)])
    child.wait_ready(600)
    serving = time.perf_counter() - t0
    with RankerClient(child.address, timeout=3600) as ranker:
        names = search(ranker, query)
    return child, serving, time.perf_counter() - t0, names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10000, help="gallery vectors (default %(default)s)")
    p.add_argument("--dim", type=int, default=512, help="their dimension (default %(default)s: the default neck)")
    p.add_argument("--rounds", type=int, default=2, help="saved/rebuilt start pairs (default %(default)s)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.n // 30 + 1, args.dim))
    matrix = np.repeat(centres, 30, axis=0)[: args.n] + 0.8 * rng.standard_normal((args.n, args.dim))
    matrix = (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)
    times: dict[str, list[tuple[float, float]]] = {"saved": [], "rebuilt": []}
    with tempfile.TemporaryDirectory(prefix="derived-restart-") as tmp, Services() as services:
        db = Path(tmp) / "g.db"
        child = services.start("ranker", RANKER_MODULE, ["--db", str(db)])
        child.wait_ready(120)
        with RankerClient(child.address, timeout=3600) as ranker:
            ranker.create_collection(COLLECTION, args.dim)
            ranker.upsert(COLLECTION, ((f"{i:08d}", v) for i, v in enumerate(matrix)))
            t0 = time.perf_counter()
            first = search(ranker, matrix[0])
            print(f"n {args.n}, dim {args.dim}: first build of the k-reciprocal data "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        child.stop()
        files = Path(tmp) / "g.db.index"
        for round_ in range(args.rounds):
            for mode in ("saved", "rebuilt"):
                saved = list(files.glob(FILES))
                if not saved:
                    raise SystemExit(f"no saved k-reciprocal data in {files} after a clean stop")
                if mode == "rebuilt":
                    for f in saved:
                        f.unlink()
                child, serving, answered, names = start(services, db, matrix[0])
                if names != first:
                    raise SystemExit(f"{mode} start answered {names[:3]}..., not {first[:3]}...")
                times[mode].append((serving, answered))
                print(f"  round {round_ + 1} {mode}: SERVING {serving:.2f} s, first k-reciprocal search "
                      f"{answered:.2f} s", flush=True)
                child.stop()  # a clean stop writes the files again (after "rebuilt": built by then)
    print("\n| start | to SERVING (s, median) | to the first k-reciprocal search answered (s, median) | ratio |")
    print("|---|---:|---:|---:|")
    base = statistics.median(a for _, a in times["rebuilt"])
    for mode in ("rebuilt", "saved"):
        serving = statistics.median(s for s, _ in times[mode])
        answered = statistics.median(a for _, a in times[mode])
        print(f"| {mode} | {serving:.2f} | {answered:.2f} | {answered / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
