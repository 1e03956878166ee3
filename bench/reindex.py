"""`imagesearch reindex` against a plain `imagesearch index` of the same
gallery with the same model, and searches through the alias while it runs
(docs/operations.md#roll-out-a-new-model).

    OMP_NUM_THREADS=1 python -m bench.reindex [--queries-per-s 10]

On clothing-small's retrieval gallery (IMAGESEARCH_CLOTHING_DIR; the bench
says so and stops where it is absent), one embedder process serves two models,
`new` (ImageNet Lite0, its default) and `old` (Lite0 with random weights: the
same cost per image, another fingerprint), beside one ranker process:

1. the alias `bench` is put on a collection indexed with `old` (not timed);
2. `imagesearch index GALLERY --collection plain` (a fresh process, `new`);
3. `imagesearch reindex GALLERY --alias bench --model new` (a fresh process:
   shadow collection, index, final sync pass, checks, switch);
2 and 3 in turn --repeats times (medians), each pair from the same start:
`plain` dropped, the alias rolled back, the shadow dropped.

A client searches through the alias the whole time at --queries-per-s, two
ways in turn: Search alone (a stored vector) and Embed + Search (a gallery
photo embedded by the default model, then searched), each without a
fingerprint so that it is answered on either side of the switch. Its
latencies are split by phase: idle (before 2), during the plain index,
during the reindex. Targets: reindex <= 1.15 x the plain index; no failed
search. Prints the tables (bench/results/reindex.md holds them with the
command).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from clients.cli import rollout
from clients.cli.jobs import index_folder
from clients.embedder import EmbedderClient
from clients.ranker import RankerClient
from testkit import ServiceProcess

ROOT = Path(__file__).resolve().parents[1]
CLOTHING = Path(os.environ.get("IMAGESEARCH_CLOTHING_DIR", ROOT.parent / "shared" / "data" / "clothing-small"))
GALLERY = CLOTHING / "retrieval" / "gallery"
TARGET = 1.15
ALIAS = "bench"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def cli(*args: str) -> float:
    """One `imagesearch` process: its seconds (its start-up included)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "clients.cli", *args, "--no-progress"], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"imagesearch {args[0]} failed ({proc.returncode}):\n{proc.stderr}")
    print(proc.stderr, file=sys.stderr)
    return seconds


class Searcher(threading.Thread):
    """Searches through the alias at a steady rate; latencies by phase and kind."""

    def __init__(self, embedder: str, ranker: str, vector, photo: bytes, rate: float):
        super().__init__(daemon=True)
        self.emb, self.rank = EmbedderClient(embedder), RankerClient(ranker)
        self.vector, self.photo, self.period = vector, photo, 1.0 / rate
        self.phase, self.stop = "idle", threading.Event()
        self.latencies: dict[tuple[str, str], list[float]] = {}
        self.failed: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            kind = "Search" if n % 2 else "Embed + Search"
            phase, start = self.phase, time.perf_counter()
            try:
                vector = self.vector if n % 2 else self.emb.embed(self.photo, "q").vector
                self.rank.search(ALIAS, vector, top_k=10)
                self.latencies.setdefault((phase, kind), []).append(time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                self.failed.append(repr(exc))
            self.stop.wait(max(0.0, self.period - (time.perf_counter() - start)))
        self.emb.close()
        self.rank.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries-per-s", type=float, default=10.0,
                   help="the searching client's rate (default %(default)s)")
    p.add_argument("--torch-threads", default="2", help="the embedder's torch threads (default %(default)s)")
    p.add_argument("--idle-s", type=float, default=15.0, help="seconds of idle searching (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5,
                   help="plain index and reindex, in turn, this many times; medians (default %(default)s)")
    args = p.parse_args(argv)
    if not GALLERY.is_dir():
        print(f"bench.reindex: clothing-small's gallery not found at {GALLERY} (set IMAGESEARCH_CLOTHING_DIR); "
              "nothing measured")
        return 0
    files = sorted(GALLERY.rglob("*.jpg"))
    with tempfile.TemporaryDirectory(prefix="bench-reindex-") as tmp:
        embedder = ServiceProcess("embedder_service", "--model", "new=efficientnet_lite0",
                                  "--model", "old=efficientnet_lite0:none", startup_timeout=300,
                                  env={"IMAGESEARCH_TORCH_THREADS": args.torch_threads})
        ranker = ServiceProcess("ranker_service", "--db", str(Path(tmp) / "g.db"))
        try:
            address = ["--embedder", embedder.address, "--ranker", ranker.address]
            with EmbedderClient(embedder.address, model="old") as old, RankerClient(ranker.address) as rank:
                rollout.index_alias(old, rank, ALIAS)
                indexed = index_folder(old, rank, GALLERY, collection=ALIAS, progress=False)
                assert indexed.done == len(files), indexed.failed
                first = next(iter(rank.list_items(ALIAS, with_vectors=True, limit=1)))
            searcher = Searcher(embedder.address, ranker.address, first.vector, files[0].read_bytes(),
                                args.queries_per_s)
            searcher.start()
            time.sleep(args.idle_s)
            plain, again = [], []
            with RankerClient(ranker.address) as rank:
                for i in range(args.repeats):
                    if i:  # back to the start: no `plain` collection, the alias on the old one, no shadow
                        rank.drop_collection("plain")
                        shadow = rollout.rollback(rank, ALIAS).previous
                        rank.drop_collection(shadow)
                    searcher.phase = "plain index"
                    plain.append(cli("index", str(GALLERY), "--collection", "plain", *address))
                    searcher.phase = "reindex"
                    again.append(cli("reindex", str(GALLERY), "--alias", ALIAS, "--model", "new", *address))
                    searcher.phase = "between"
                searcher.stop.set()
                searcher.join()
                target = rollout.find_alias(rank, ALIAS).collection
        finally:
            ranker.terminate()
            embedder.terminate()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    plain_s, reindex_s = statistics.median(plain), statistics.median(again)
    ratio = reindex_s / plain_s
    lines = [(f"{len(files)} photos of clothing-small's retrieval gallery; efficientnet_lite0 on CPU "
              f"({args.torch_threads} torch threads); {cores} cores usable of os.cpu_count() {os.cpu_count()}; "
              f"{platform.node()}; alias now on {target!r}"), "",
             f"| measure (median of {args.repeats}, each a fresh process) | seconds | runs | ratio | target |",
             "|---|---:|---|---:|---:|",
             (f"| plain `index`, {len(files)} photos | {plain_s:.2f} | {' '.join(f'{s:.1f}' for s in plain)} "
              "| 1.00 | |"),
             (f"| `reindex` (index, final sync pass, checks, switch) | {reindex_s:.2f} | "
              f"{' '.join(f'{s:.1f}' for s in again)} | {ratio:.2f} | "
              f"<= {TARGET} {'met' if ratio <= TARGET else 'MISSED'} |"),
             "",
             (f"A client searching through the alias at {args.queries_per_s:g}/s "
              f"({len(searcher.failed)} failed calls):"), "",
             "| phase | search | calls | p50 ms | p99 ms |", "|---|---|---:|---:|---:|"]
    for phase in ("idle", "plain index", "reindex"):
        for kind in ("Search", "Embed + Search"):
            ms = [1000 * s for s in searcher.latencies.get((phase, kind), [])]
            lines.append(f"| {phase} | {kind} | {len(ms)} | {statistics.median(ms) if ms else float('nan'):.1f} | "
                         f"{percentile(ms, 0.99):.1f} |")
    print("\n".join(lines))
    if searcher.failed:
        print(f"failed searches: {searcher.failed[:3]}")
    return 0 if ratio <= TARGET and not searcher.failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
