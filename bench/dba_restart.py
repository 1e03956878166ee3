"""A DBA collection's restart: its augmented vectors read back from disk against rebuilt.

    python bench/dba_restart.py [--n 10000] [--dim 512] [--rounds 2]

A real ranker process over a temporary SQLite file holds one exact collection
with database-side augmentation (n 2, alpha 3) of `--n` clustered random unit
vectors. After a clean stop (which writes the augmented vectors next to the
index files, ranker_service/index_files.py) the ranker is started again, in
turn with those files ("saved") and with them removed ("rebuilt": the
O(G^2) derivation runs in the background at start-up, as it did before the
files existed). Per start: seconds from the process start to health SERVING
and to the first answered search of the DBA collection (which waits for the
augmented vectors), side by side over `--rounds` rounds, and the median ratio.
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
from clients.services import RANKER_MODULE, Services  # noqa: E402
from clients.types import DatabaseAugmentation  # noqa: E402

COLLECTION = "dba"


def start(services: Services, db: Path, query: np.ndarray) -> tuple[object, float, float, list]:
    """(child, seconds to SERVING, seconds to the first DBA search answered, its names)."""
    t0 = time.perf_counter()
    child = services.start("ranker", RANKER_MODULE, ["--db", str(db)])
    child.wait_ready(600)
    serving = time.perf_counter() - t0
    with RankerClient(child.address, timeout=3600) as ranker:
        matches = ranker.search(COLLECTION, query, top_k=10)
    return child, serving, time.perf_counter() - t0, [m.name for m in matches]


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
    with tempfile.TemporaryDirectory(prefix="dba-restart-") as tmp, Services() as services:
        db = Path(tmp) / "g.db"
        child = services.start("ranker", RANKER_MODULE, ["--db", str(db)])
        child.wait_ready(120)
        with RankerClient(child.address, timeout=3600) as ranker:
            ranker.create_collection(COLLECTION, args.dim, dba=DatabaseAugmentation(top_n=2))
            ranker.upsert(COLLECTION, ((f"{i:08d}", v) for i, v in enumerate(matrix)))
            t0 = time.perf_counter()
            first = [m.name for m in ranker.search(COLLECTION, matrix[0], top_k=10)]
            print(f"n {args.n}, dim {args.dim}: first build of the augmented vectors {time.perf_counter() - t0:.1f} s",
                  flush=True)
        child.stop()
        files = Path(tmp) / "g.db.index"
        for round_ in range(args.rounds):
            for mode in ("saved", "rebuilt"):
                if mode == "rebuilt":
                    for f in files.glob("*.dba.*"):
                        f.unlink()
                elif not list(files.glob("*.dba.json")):
                    raise SystemExit(f"no saved augmented vectors in {files} after a clean stop")
                child, serving, answered, names = start(services, db, matrix[0])
                if names != first:
                    raise SystemExit(f"{mode} start answered {names[:3]}..., not {first[:3]}...")
                times[mode].append((serving, answered))
                print(f"  round {round_ + 1} {mode}: SERVING {serving:.2f} s, first DBA search {answered:.2f} s",
                      flush=True)
                child.stop()  # a clean stop writes the files again (after "rebuilt")
    print("\n| start | to SERVING (s, median) | to the first DBA search answered (s, median) | ratio |")
    print("|---|---:|---:|---:|")
    base = statistics.median(a for _, a in times["rebuilt"])
    for mode in ("rebuilt", "saved"):
        serving = statistics.median(s for s, _ in times[mode])
        answered = statistics.median(a for _, a in times[mode])
        print(f"| {mode} | {serving:.2f} | {answered:.2f} | {answered / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
