"""Online backup of a running ranker: how long it takes, and how long a write
waits behind it.

    python -m bench.backup --vectors 50000 --dim 1280

Builds a database of random unit vectors (bulk_load), starts a real ranker on
it, and runs `RankerClient.backup` while a second client upserts one item at a
time; reports the backup's wall time and size, the copy step (the time writes
wait, from the ranker's log) and the slowest concurrent upsert.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from clients.ranker import RankerClient
from testkit import ServiceProcess
from ranker_service.sqlite.store import Store, bulk_load


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vectors", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=1280)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        store = Store.open(db)
        for start in range(0, args.vectors, 10_000):
            n = min(10_000, args.vectors - start)
            v = rng.standard_normal((n, args.dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            bulk_load(store, "c", [f"n{start + i}" for i in range(n)], v)
        store.close()
        latencies: list[float] = []
        stop = threading.Event()
        with ServiceProcess("ranker_service", "--db", str(db), startup_timeout=600) as ranker, \
                RankerClient(ranker.address) as writer, RankerClient(ranker.address) as backer:
            one = rng.standard_normal(args.dim).astype(np.float32)

            def write():
                i = 0
                while not stop.is_set():
                    started = time.perf_counter()
                    writer.upsert("c", [(f"w{i}", one)])
                    latencies.append(time.perf_counter() - started)
                    i += 1

            thread = threading.Thread(target=write)
            thread.start()
            time.sleep(1.0)
            started = time.perf_counter()
            result = backer.backup(Path(tmp) / "copy.db")
            wall = time.perf_counter() - started
            time.sleep(0.5)
            stop.set()
            thread.join()
            waited = [float(x) for x in re.findall(r"writes waited ([\d.]+) s", ranker.output)]
    print(f"{args.vectors} x {args.dim}: backup {result.size / 1e6:.0f} MB in {wall:.2f} s; "
          f"copy step (writes wait) {waited[-1]:.2f} s; concurrent 1-item upserts: {len(latencies)}, "
          f"median {1e3 * float(np.median(latencies)):.1f} ms, max {1e3 * max(latencies):.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
