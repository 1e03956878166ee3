"""Index kinds at scale: `python -m bench.ranker --sizes 1000000 --kinds exact,exact16,hnsw,ivf_pq`.

For each size G and kind, on clustered data (bench/ranker_data.py: Lite0
ImageNet embeddings of the clothing-small photos as centres, + noise of norm
0.5, normalised, seed 0; queries from seed 1):

1. The SQLite database of G vectors is written once per size through the
   store module (kept in --workdir and reused by later runs), with the float64
   ground truth top-10 of every query computed in the same pass, chunk by
   chunk (never the whole matrix in float64).
2. The collection's kind is set in the database (its index files removed)
   and a ranker process starts: it reads SQLite and builds the index
   (build time: the FAISS adds and training, from its log; "first start":
   the whole start, reading SQLite included) and writes its index files.
3. SIGTERM, and a second start from the index files: start-up time (process
   start to health SERVING, and the logged load time), anonymous RSS per
   vector (RssAnon loaded minus RssAnon of a ranker on an empty database;
   names and ids included; page cache of on-disk vectors not counted), then
   Search over gRPC one query at a time: p50/p99, recall@10 against the
   float64 ground truth, and for exact16 whether the top-10 equals the
   float64 one except where scores differ by at most 1e-3 (ties).

One kind per run is kinder to a small machine (`--kinds hnsw`); results go to
bench/results/ranker_kinds_<kind>_<G>.json and a table is printed.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np

from bench.ranker_data import clothing_centres, clustered_chunks
from testkit import ServiceProcess
from imagesearch.v1 import ranker_pb2 as pb
from imagesearch.v1 import ranker_pb2_grpc
from ranker_service.sqlite import snapshots
from ranker_service.sqlite.store import Store, bulk_load
from ranker_service.validation import make_spec, spec_from_json

COLLECTION = "bench"
K = 10
CHUNK = 65536
LABELS = {"exact": ("exact", {}), "exact16": ("exact", {"float16": True}), "hnsw": ("hnsw", {}),
          "ivf_pq": ("ivf_pq", {})}
BUILT = re.compile(r"built from SQLite in ([\d.]+)s")
LOADED = re.compile(r"loaded (\d+) vectors in \d+ collections .* in ([\d.]+)s")


def names_for(G: int) -> list[str]:
    return [f"img/{i:07d}.jpg" for i in range(G)]


def rss_anon_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/PID/status")


def prepare(G: int, queries: np.ndarray, centres: np.ndarray, workdir: Path, seed: int) -> tuple[Path, dict]:
    """The database of G vectors and the float64 ground truth (cached in workdir)."""
    db = workdir / f"g{G}.db"
    truth_path = workdir / f"g{G}-truth-q{queries.shape[0]}.npz"
    if db.exists() and truth_path.exists():
        t = np.load(truth_path)
        return db, {"ids": t["ids"], "scores": t["scores"], "reused": True}
    for f in workdir.glob(f"g{G}.db*"):
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    q64 = queries.astype(np.float64)
    best_ids = np.zeros((q64.shape[0], 0), dtype=np.int64)
    best_scores = np.zeros((q64.shape[0], 0))
    names = names_for(G)
    store = Store.open(db)
    t0 = time.perf_counter()
    start = 0
    for block in clustered_chunks(centres, G, seed, CHUNK):
        bulk_load(store, COLLECTION, names[start:start + block.shape[0]], block, fingerprint="bench", batch=4096)
        scores = q64 @ block.astype(np.float64).T
        ids = np.broadcast_to(np.arange(start, start + block.shape[0]), scores.shape)
        all_scores = np.concatenate([best_scores, scores], axis=1)
        all_ids = np.concatenate([best_ids, ids], axis=1)
        # best first, ties by id (= by name: names are zero-padded ids)
        order = np.lexsort((all_ids, -all_scores), axis=1)[:, :K]
        best_scores = np.take_along_axis(all_scores, order, axis=1)
        best_ids = np.take_along_axis(all_ids, order, axis=1)
        start += block.shape[0]
        print(f"  wrote {start:,} rows ({time.perf_counter() - t0:.0f}s)", flush=True)
    store.close()
    np.savez(truth_path, ids=best_ids, scores=best_scores)
    return db, {"ids": best_ids, "scores": best_scores, "reused": False, "write_s": time.perf_counter() - t0}


def set_kind(db: Path, label: str, params: dict, rebuild: bool = True) -> bool:
    """Set the collection's kind; remove its index files unless `rebuild` is
    False and the build parameters are unchanged. True if it will be built."""
    kind, base = LABELS[label]
    spec = make_spec(kind, **{**base, **params})
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        old = spec_from_json(*conn.execute("SELECT kind, params FROM collections WHERE name = ?",
                                           [COLLECTION]).fetchone())
        conn.execute("UPDATE collections SET kind = ?, params = ? WHERE name = ?", [spec.kind, spec.to_json(),
                                                                                   COLLECTION])
    folder = snapshots.folder_for(db)
    if (old.kind, old.build_params()) == (spec.kind, spec.build_params()) and not rebuild:
        return False  # only search-time parameters changed: the index files stay valid
    if folder.exists():
        shutil.rmtree(folder)
    return True


def start(db: Path, env: dict) -> tuple[ServiceProcess, float]:
    t0 = time.perf_counter()
    proc = ServiceProcess("ranker_service", "--db", str(db), startup_timeout=7200,
                          env={"IMAGESEARCH_LOG_LEVEL": "INFO", **env})
    return proc, time.perf_counter() - t0


def bench_kind(G: int, label: str, db: Path, truth: dict, queries: np.ndarray, params: dict, env: dict,
               rss_empty_kb: int, reuse: bool = False) -> dict:
    print(f"\n== {label}, G = {G:,} ==", flush=True)
    built = set_kind(db, label, params, rebuild=not reuse)
    proc, first_s = start(db, env)
    build = BUILT.search(proc.output)
    build_s = float(build.group(1)) if build else float("nan")
    first_load = LOADED.search(proc.output)
    print(f"first start (read SQLite + build + write index files) {first_s:.1f}s, build {build_s:.1f}s", flush=True)
    proc.terminate(timeout=1800)
    proc, startup_s = start(db, env)
    try:
        assert "loaded from its index files" in proc.output, proc.output
        load = LOADED.search(proc.output)
        rss_kb = rss_anon_kb(proc.proc.pid)
        bytes_per_vector = (rss_kb - rss_empty_kb) * 1024 / G
        print(f"start-up from index files {startup_s:.1f}s (load {load.group(2) if load else '?'}s); "
              f"anonymous RSS {bytes_per_vector:.0f} B/vector", flush=True)
        channel = proc.channel()
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        (stats,) = stub.GetStats(pb.GetStatsRequest(collection=COLLECTION), timeout=60).collections
        assert stats.count == G
        lists = [q.tolist() for q in queries]
        times, hits, tie_ok, equal = [], 0, 0, 0
        for i in range(-5, len(lists)):  # 5 warm-up calls
            q = lists[i % len(lists)]
            t0 = time.perf_counter()
            got = [r.match for r in stub.Search(pb.SearchRequest(collection=COLLECTION, vector=q, top_k=K),
                                                timeout=600)]
            took = time.perf_counter() - t0
            if i < 0:
                continue
            times.append(took)
            got_ids = [int(m.name[4:11]) for m in got]
            want = truth["ids"][i]
            hits += len(set(got_ids) & set(want.tolist()))
            equal += got_ids == want.tolist()
            tie_ok += all(g == w or abs(m.score - s) <= 1e-3
                          for g, w, m, s in zip(got_ids, want, got, truth["scores"][i]))
        channel.close()
    finally:
        proc.terminate(timeout=1800)
    n = len(times)
    result = {
        "kind": label, "G": G, "dim": int(queries.shape[1]),
        "params": {f.name: v for f, v in stats.index.ListFields()},
        "queries": n, "p50_ms": float(np.percentile(times, 50)) * 1e3, "p99_ms": float(np.percentile(times, 99)) * 1e3,
        "recall_at_10": hits / (K * n), "top10_equal": equal / n, "top10_equal_but_ties_1e-3": tie_ok / n,
        "rss_anon_bytes_per_vector": bytes_per_vector, "rss_ratio_to_4dim": bytes_per_vector / (4 * queries.shape[1]),
        "first_start_s": first_s, "build_s": build_s, "built_this_run": built,
        "first_load_log_s": float(first_load.group(2)) if first_load else None,
        "startup_s": startup_s, "startup_load_log_s": float(load.group(2)) if load else None,
    }
    print(json.dumps(result, indent=1), flush=True)
    return result


def table(results: list[dict]) -> str:
    row = "| {:<8} | {:>9} | {:>17} | {:>9} | {:>14} | {:>9} | {:>15} | {:>12} |".format
    lines = [row("kind", "G", "p50 / p99 (ms)", "recall@10", "anon B/vector", "build (s)", "first start (s)",
                 "start-up (s)"),
             "|" + "|".join("-" * w for w in (10, 11, 19, 11, 16, 11, 17, 14)) + "|"]
    for r in results:
        lines.append(row(r["kind"], f"{r['G']:,}", f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}",
                         f"{r['recall_at_10']:.3f}", f"{r['rss_anon_bytes_per_vector']:.0f}",
                         f"{r['build_s']:.1f}", f"{r['first_start_s']:.1f}", f"{r['startup_s']:.1f}"))
    return "\n".join(lines)


def main(args) -> list[dict]:
    labels = [k for k in args.kinds.split(",") if k]
    unknown = set(labels) - set(LABELS)
    if unknown:
        raise SystemExit(f"unknown kinds {sorted(unknown)}: use {', '.join(LABELS)}")
    params = json.loads(args.index_params or "{}")
    env = {"IMAGESEARCH_RANKER_BLAS_THREADS": args.blas_threads}
    sizes = [int(s) for s in args.sizes.split(",") if s]
    centres = clothing_centres()
    queries = next(clustered_chunks(centres, args.queries, args.seed + 1, CHUNK))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    empty, _ = start(workdir / "empty.db", env)
    rss_empty_kb = rss_anon_kb(empty.proc.pid)
    empty.terminate()
    results = []
    for G in sizes:
        print(f"\n== data: G = {G:,} x {centres.shape[1]} ({centres.shape[0]} centres) ==", flush=True)
        db, truth = prepare(G, queries, centres, workdir, args.seed)
        for label in labels:
            result = bench_kind(G, label, db, truth, queries, params, env, rss_empty_kb, args.reuse_index)
            results.append(result)
            out = Path(args.out).parent / f"ranker_kinds_{label}_{G}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2))
    print("\n" + table(results))
    return results
