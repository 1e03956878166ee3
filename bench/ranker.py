"""Ranker benchmark: search latency and throughput against bare numpy, the
seed notebook's per-pair cosine loop, memory per vector and start-up load.

    .venv/bin/python -m bench.ranker            # G = 10k and 100k, dim 1280
    .venv/bin/python -m bench.ranker --quick    # G = 10k, fewer queries
    .venv/bin/python -m bench.ranker --sizes 1000000 --kinds exact,exact16,hnsw,ivf_pq   # bench/ranker_kinds.py

For each gallery size G (random unit vectors, dim 1280), measured side by side
in one run:

(a) Search latency p50/p99: over gRPC (a real ranker process on port 0 with a
    temporary SQLite file) and the core `Registry` alone, each against a
    bare numpy product + argpartition over the same matrix (the three calls
    interleaved per query, in a random order).
(b) SearchStream queries/s for N queries on one stream, against bare numpy
    batched the same way (the server's --max-batch) and the core's search_many.
(c) The seed notebook's loop, one `nn.CosineSimilarity` call per (query,
    gallery item) pair, on a small gallery: its time per query against the core.
(d) Resident memory per stored vector as a ratio to 4 x dim bytes: the ranker
    process's VmRSS loaded minus VmRSS on an empty database (and VmHWM, the
    peak, which shows the load makes no second copy), plus GetStats.memory_bytes.
(e) Start-up: process start to health SERVING, and the logged load time.
Also: bulk load through the store module, and a smaller gRPC Upsert (items/s).

Prints a table and writes bench/results/ranker.json.
"""

from __future__ import annotations

import os

# Same BLAS threads in this process (bare numpy, the core) as in the ranker.
BLAS_THREADS = os.environ.get("IMAGESEARCH_RANKER_BLAS_THREADS") or "1"
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, BLAS_THREADS)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from clients.channels import FAST_UNARY_STREAM  # noqa: E402
from testkit import ServiceProcess  # noqa: E402
from imagesearch.v1 import ranker_pb2 as pb  # noqa: E402
from imagesearch.v1 import ranker_pb2_grpc  # noqa: E402
from ranker_service.memory.registry import Registry  # noqa: E402
from ranker_service.servicer import DEFAULT_MAX_BATCH  # noqa: E402
from ranker_service.sqlite.store import Store, bulk_load  # noqa: E402
from ranker_service.types import Query  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COLLECTION = "bench"
K = 10
LOADED = re.compile(r"loaded (\d+) vectors .* in ([\d.]+)s")


def unit_rows(rng: np.random.Generator, n: int, dim: int, chunk: int = 8192) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim))
        out[start:start + block.shape[0]] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def bare_top_k(matrix: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = matrix @ q
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def bare_top_k_batch(matrix: np.ndarray, queries: np.ndarray, k: int) -> list[np.ndarray]:
    scores = queries @ matrix.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    return [t[np.argsort(-s[t])] for t, s in zip(top, scores)]


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values), p))


def rss_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def start_ranker(db: Path, *extra: str) -> tuple[ServiceProcess, float]:
    t0 = time.perf_counter()
    proc = ServiceProcess("ranker_service", "--db", str(db), *extra, startup_timeout=600,
                          env={"IMAGESEARCH_RANKER_BLAS_THREADS": BLAS_THREADS, "IMAGESEARCH_LOG_LEVEL": "INFO"})
    return proc, time.perf_counter() - t0


def seed_notebook_loop(gallery: np.ndarray, names: list[str], queries: np.ndarray, k: int) -> tuple[float, list]:
    """The seed notebook's ranking: one nn.CosineSimilarity per pair, .item(), sort."""
    import torch
    from torch import nn

    torch.set_num_threads(int(BLAS_THREADS))
    cos = nn.CosineSimilarity(dim=1, eps=1e-6)
    gallery_embeddings = {name: torch.from_numpy(row).unsqueeze(0) for name, row in zip(names, gallery)}
    times, answers = [], []
    for q in queries:
        query_embedding = torch.from_numpy(q).unsqueeze(0)
        t0 = time.perf_counter()
        similarity = {}
        for name, emb in gallery_embeddings.items():
            similarity[name] = cos(query_embedding, emb).item()
        top = sorted(similarity, key=similarity.get, reverse=True)[:k]
        times.append(time.perf_counter() - t0)
        answers.append(top)
    return float(np.median(times)), answers


def bench_size(G: int, args, rng: np.random.Generator, workdir: Path, rss_empty_kb: int) -> dict:
    dim = args.dim
    print(f"\n== G = {G:,} x {dim} ==", flush=True)
    matrix = unit_rows(rng, G, dim)
    names = [f"img/{i:07d}.jpg" for i in range(G)]
    db = workdir / f"g{G}.db"

    # Bulk load through the store module (no server running: the file is free).
    store = Store.open(db)
    t0 = time.perf_counter()
    bulk_load(store, COLLECTION, names, matrix, fingerprint="bench", batch=2000)
    bulk_s = time.perf_counter() - t0
    store.close()
    print(f"bulk load via store: {G / bulk_s:,.0f} rows/s ({db.stat().st_size / 1e6:.0f} MB file)", flush=True)

    # (e) start-up and (d) memory.
    proc, startup_s = start_ranker(db)
    try:
        m = LOADED.search(proc.output)
        load_s = float(m.group(2)) if m else float("nan")
        mem = rss_kb(proc.proc.pid)
        channel = proc.channel(FAST_UNARY_STREAM)  # the client library's streaming option
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        stats = stub.GetStats(pb.GetStatsRequest(collection=COLLECTION), timeout=60)
        memory_bytes = stats.collections[0].memory_bytes
        assert stats.collections[0].count == G
        rss_per_vector = (mem["VmRSS"] - rss_empty_kb) * 1024 / G
        hwm_per_vector = (mem["VmHWM"] - rss_empty_kb) * 1024 / G
        print(f"start-up {startup_s:.2f}s (load {load_s:.2f}s); RSS/vector {rss_per_vector:.0f} B "
              f"= {rss_per_vector / (4 * dim):.3f} x 4*dim", flush=True)

        # The core alone, in this process, over its own copy of the matrix.
        index = Registry()
        index.upsert(COLLECTION, names, matrix, "bench")

        # (a) latency, interleaved: bare, core, gRPC.
        queries = rng.standard_normal((args.queries + 5, dim)).astype(np.float32)
        qn = (queries / np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)
        query_lists = [q.tolist() for q in queries]  # protobuf copies lists far faster than arrays
        t_bare, t_core, t_grpc, t_paged = [], [], [], []
        agree = True
        order_rng = np.random.default_rng(G)
        for i in range(queries.shape[0]):
            runs = {
                "bare": lambda: [names[j] for j in bare_top_k(matrix, qn[i], K)],
                "core": lambda: [m.name for m in index.search(Query(COLLECTION, queries[i], K))],
                "grpc": lambda: [r.match.name for r in stub.Search(
                    pb.SearchRequest(collection=COLLECTION, vector=query_lists[i], top_k=K), timeout=60)],
                "grpc_paged": lambda: [m.name for r in stub.Search(
                    pb.SearchRequest(collection=COLLECTION, vector=query_lists[i], top_k=K, page_size=K), timeout=60)
                    for m in r.matches],
            }
            got, took = {}, {}
            for name in order_rng.permutation(list(runs)):  # a fresh order each time: no order bias
                t0 = time.perf_counter()
                got[name] = runs[name]()
                took[name] = time.perf_counter() - t0
            if i >= 5:  # warm-up excluded
                t_bare.append(took["bare"])
                t_core.append(took["core"])
                t_grpc.append(took["grpc"])
                t_paged.append(took["grpc_paged"])
            agree &= got["bare"] == got["core"] == got["grpc"] == got["grpc_paged"]
        t_unary = []
        for _ in range(len(t_grpc)):
            t0 = time.perf_counter()
            stub.GetStats(pb.GetStatsRequest(collection=COLLECTION), timeout=60)
            t_unary.append(time.perf_counter() - t0)
        lat = {name: {"p50_ms": pct(ts, 50) * 1e3, "p99_ms": pct(ts, 99) * 1e3}
               for name, ts in (("bare_numpy", t_bare), ("core", t_core), ("grpc", t_grpc),
                                ("grpc_paged", t_paged), ("grpc_getstats_round_trip", t_unary))}
        bare50, bare99 = lat["bare_numpy"]["p50_ms"], lat["bare_numpy"]["p99_ms"]
        for name in ("core", "grpc", "grpc_paged"):
            lat[name]["p50_ratio"] = lat[name]["p50_ms"] / bare50
            lat[name]["p99_ratio"] = lat[name]["p99_ms"] / bare99
        print(f"search p50: bare {bare50:.2f} ms, core {lat['core']['p50_ms']:.2f} ms, "
              f"gRPC {lat['grpc']['p50_ms']:.2f} ms", flush=True)

        # (b) SearchStream throughput vs bare batched and core batched.
        nq = args.stream_queries
        sq = rng.standard_normal((nq, dim)).astype(np.float32)
        sqn = (sq / np.linalg.norm(sq.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)
        sq_lists = [q.tolist() for q in sq]
        t0 = time.perf_counter()
        answers = list(stub.SearchStream(iter(
            pb.SearchStreamRequest(id=str(i), collection=COLLECTION, vector=sq_lists[i], top_k=K) for i in range(nq)),
            timeout=600))
        stream_s = time.perf_counter() - t0
        assert len(answers) == nq and not any(a.HasField("error") for a in answers)
        t0 = time.perf_counter()
        bare_batched = []
        for start in range(0, nq, DEFAULT_MAX_BATCH):
            bare_batched += bare_top_k_batch(matrix, sqn[start:start + DEFAULT_MAX_BATCH], K)
        bare_stream_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        core_batched = []
        for start in range(0, nq, DEFAULT_MAX_BATCH):
            core_batched += index.search_many([Query(COLLECTION, q, K) for q in sq[start:start + DEFAULT_MAX_BATCH]])
        core_stream_s = time.perf_counter() - t0
        stream_agree = all([m.name for m in a.matches] == [m.name for m in c] == [names[j] for j in b]
                           for a, c, b in zip(answers, core_batched, bare_batched))
        stream = {"queries": nq, "grpc_qps": nq / stream_s, "core_qps": nq / core_stream_s,
                  "bare_numpy_qps": nq / bare_stream_s, "grpc_ratio": (nq / stream_s) / (nq / bare_stream_s),
                  "core_ratio": (nq / core_stream_s) / (nq / bare_stream_s), "results_agree": stream_agree}
        print(f"SearchStream: gRPC {stream['grpc_qps']:.0f} q/s, core {stream['core_qps']:.0f} q/s, "
              f"bare {stream['bare_numpy_qps']:.0f} q/s", flush=True)

        # A smaller gRPC Upsert (its own collection: the bench matrix stays as is).
        n_up = min(args.upsert_items, G)
        up_lists = [matrix[i].tolist() for i in range(n_up)]
        t0 = time.perf_counter()
        response = stub.Upsert(iter(pb.UpsertRequest(collection="upsert-bench", name=names[i], vector=up_lists[i],
                                                     fingerprint="bench") for i in range(n_up)), timeout=600)
        upsert_s = time.perf_counter() - t0
        assert response.upserted == n_up
        channel.close()
    finally:
        rc = proc.terminate()
    index = None  # drop the core's copy of the matrix before the next size
    return {
        "G": G, "dim": dim,
        "latency": lat, "latency_results_agree": bool(agree), "search_stream": stream,
        "memory": {"rss_empty_kb": rss_empty_kb, "rss_loaded_kb": mem["VmRSS"], "hwm_loaded_kb": mem["VmHWM"],
                   "rss_bytes_per_vector": rss_per_vector, "rss_ratio": rss_per_vector / (4 * dim),
                   "peak_bytes_per_vector": hwm_per_vector, "peak_ratio": hwm_per_vector / (4 * dim),
                   "stats_memory_bytes": memory_bytes, "stats_ratio": memory_bytes / (G * 4 * dim)},
        "startup": {"to_serving_s": startup_s, "load_s": load_s},
        "writes": {"store_bulk_rows_per_s": G / bulk_s, "grpc_upsert_items": n_up,
                   "grpc_upsert_items_per_s": n_up / upsert_s, "db_file_mb": db.stat().st_size / 1e6},
        "ranker_exit_code": rc,
    }


def bench_seed_loop(args, rng: np.random.Generator) -> dict:
    G, dim = args.loop_gallery, args.dim
    print(f"\n== seed notebook loop, G = {G:,} ==", flush=True)
    matrix = unit_rows(rng, G, dim)
    names = [f"img/{i:07d}.jpg" for i in range(G)]
    queries = rng.standard_normal((args.loop_queries, dim)).astype(np.float32)
    loop_s, loop_answers = seed_notebook_loop(matrix, names, queries, K)
    index = Registry()
    index.upsert(COLLECTION, names, matrix, "")
    core_t, bare_t, agree = [], [], True
    for _ in range(3):  # repeat: the core is fast, take the median
        for q, loop_answer in zip(queries, loop_answers):
            t0 = time.perf_counter()
            core = index.search(Query(COLLECTION, q, K))
            t1 = time.perf_counter()
            qn = (q / np.linalg.norm(q.astype(np.float64))).astype(np.float32)
            bare_top_k(matrix, qn, K)
            t2 = time.perf_counter()
            core_t.append(t1 - t0)
            bare_t.append(t2 - t1)
            agree &= [m.name for m in core] == loop_answer
    core_s, bare_s = float(np.median(core_t)), float(np.median(bare_t))
    print(f"per query: loop {loop_s * 1e3:.1f} ms, core {core_s * 1e3:.3f} ms", flush=True)
    return {"G": G, "dim": dim, "queries": len(queries), "loop_ms_per_query": loop_s * 1e3,
            "core_ms_per_query": core_s * 1e3, "bare_numpy_ms_per_query": bare_s * 1e3,
            "speedup_core_vs_loop": loop_s / core_s, "results_agree": bool(agree)}


def bench_request_build(dim: int, rng: np.random.Generator, reps: int = 300) -> dict:
    """Client side: a SearchRequest built from a numpy array vs from a list."""
    v = rng.standard_normal(dim).astype(np.float32)
    out = {}
    for name, value in (("ndarray", v), ("list", v.tolist())):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            pb.SearchRequest(collection=COLLECTION, vector=value, top_k=K)
            ts.append(time.perf_counter() - t0)
        out[f"{name}_ms"] = pct(ts, 50) * 1e3
    return out


def table(results: dict) -> str:
    lines = []
    row = "| {:<44} | {:>12} | {:>10} | {:>16} |".format
    lines.append(row("measure", "value", "ratio", "target"))
    lines.append("|" + "-" * 46 + "|" + "-" * 14 + "|" + "-" * 12 + "|" + "-" * 18 + "|")
    for r in results["sizes"]:
        G, lat, st, mem = r["G"], r["latency"], r["search_stream"], r["memory"]
        tag = f"G={G // 1000}k"
        bare50 = lat["bare_numpy"]["p50_ms"]
        lines.append(row(f"{tag} bare numpy Search p50 / p99 (ms)",
                         f"{bare50:.2f} / {lat['bare_numpy']['p99_ms']:.2f}", "1.00", ""))
        lines.append(row(f"{tag} core Search p50 / p99 (ms)",
                         f"{lat['core']['p50_ms']:.2f} / {lat['core']['p99_ms']:.2f}",
                         f"{lat['core']['p50_ratio']:.2f}", "<= 1.2"))
        grpc_target = 1.5 * bare50 + 2.0
        lines.append(row(f"{tag} gRPC Search p50 / p99 (ms)",
                         f"{lat['grpc']['p50_ms']:.2f} / {lat['grpc']['p99_ms']:.2f}",
                         f"{lat['grpc']['p50_ratio']:.2f}", f"<= {grpc_target:.1f} ms" if G >= 100_000 else ""))
        lines.append(row(f"{tag} gRPC Search, page_size=k, p50 / p99 (ms)",
                         f"{lat['grpc_paged']['p50_ms']:.2f} / {lat['grpc_paged']['p99_ms']:.2f}",
                         f"{lat['grpc_paged']['p50_ratio']:.2f}", f"<= {1.3 * bare50 + 1.0:.1f} ms"))
        lines.append(row(f"{tag} gRPC GetStats round trip p50 (ms)",
                         f"{lat['grpc_getstats_round_trip']['p50_ms']:.2f}", "", "(the gRPC floor)"))
        lines.append(row(f"{tag} SearchStream {st['queries']} queries (q/s)",
                         f"{st['grpc_qps']:.0f}", f"{st['grpc_ratio']:.2f}", "vs bare batched"))
        lines.append(row(f"{tag} core search_many / bare batched (q/s)",
                         f"{st['core_qps']:.0f} / {st['bare_numpy_qps']:.0f}", f"{st['core_ratio']:.2f}", ""))
        lines.append(row(f"{tag} RSS per vector (bytes; peak)",
                         f"{mem['rss_bytes_per_vector']:.0f}; {mem['peak_bytes_per_vector']:.0f}",
                         f"{mem['rss_ratio']:.3f}", "<= 1.15 x 4*dim"))
        lines.append(row(f"{tag} GetStats memory_bytes per vector",
                         f"{mem['stats_memory_bytes'] / G:.0f}", f"{mem['stats_ratio']:.3f}", ""))
        lines.append(row(f"{tag} start-up to SERVING / load (s)",
                         f"{r['startup']['to_serving_s']:.2f} / {r['startup']['load_s']:.2f}", "", ""))
        lines.append(row(f"{tag} bulk store load / gRPC Upsert (items/s)",
                         f"{r['writes']['store_bulk_rows_per_s']:.0f} / {r['writes']['grpc_upsert_items_per_s']:.0f}",
                         "", ""))
    s = results["seed_loop"]
    lines.append(row(f"G={s['G']} seed loop / core per query (ms)",
                     f"{s['loop_ms_per_query']:.1f} / {s['core_ms_per_query']:.3f}",
                     f"{s['speedup_core_vs_loop']:.0f}x", "speed-up"))
    c = results["client_request_build"]
    lines.append(row("client: SearchRequest from ndarray / list (ms)",
                     f"{c['ndarray_ms']:.3f} / {c['list_ms']:.3f}", "", ""))
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,100000", help="gallery sizes G, comma-separated (default %(default)s)")
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--queries", type=int, default=200, help="Search calls per size for p50/p99")
    p.add_argument("--stream-queries", type=int, default=1000, help="queries on one SearchStream")
    p.add_argument("--loop-gallery", type=int, default=2000, help="gallery size for the seed notebook loop")
    p.add_argument("--loop-queries", type=int, default=3)
    p.add_argument("--upsert-items", type=int, default=5000, help="items in the timed gRPC Upsert")
    p.add_argument("--quick", action="store_true", help="G = 10k only, fewer queries (a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    k = p.add_argument_group("index kinds (bench/ranker_kinds.py; clustered data, float64 ground truth)")
    k.add_argument("--kinds", default="", help="run the index-kind benchmark for these kinds instead, "
                   "comma-separated: exact,exact16,hnsw,ivf_pq")
    k.add_argument("--index-params", default="", help='JSON parameters for every kind, e.g. \'{"hnsw_m": 16}\'')
    k.add_argument("--reuse-index", action="store_true",
                   help="keep the index files of the last run when only search-time parameters (ef_search, "
                        "nprobe, rerank_factor) changed: a parameter sweep without rebuilding")
    k.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "bench-ranker-kinds"),
                   help="where the databases and ground truth are kept between runs (default %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ranker.json")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.kinds:
        from bench import ranker_kinds

        args.blas_threads = BLAS_THREADS
        return {"kinds": ranker_kinds.main(args)}
    if args.quick:
        args.sizes, args.queries, args.stream_queries = "10000", 50, 200
        args.loop_gallery, args.loop_queries, args.upsert_items = 500, 2, 1000
    sizes = [int(s) for s in args.sizes.split(",") if s]
    rng = np.random.default_rng(args.seed)
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "machine": {"cpus": os.cpu_count(), "blas_threads": int(BLAS_THREADS), "numpy": np.__version__,
                           "python": platform.python_version(), "platform": platform.platform()},
               "sizes": []}
    with tempfile.TemporaryDirectory(prefix="bench-ranker-") as tmp:
        workdir = Path(tmp)
        empty, _ = start_ranker(workdir / "empty.db")
        rss_empty_kb = rss_kb(empty.proc.pid)["VmRSS"]
        empty.terminate()
        for G in sizes:
            results["sizes"].append(bench_size(G, args, rng, workdir, rss_empty_kb))
            for f in workdir.glob(f"g{G}.db*"):
                shutil.rmtree(f) if f.is_dir() else f.unlink()  # the ranker's index files live in a folder
    results["seed_loop"] = bench_seed_loop(args, rng)
    results["client_request_build"] = bench_request_build(args.dim, rng)
    text = table(results)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results["table"] = text
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
