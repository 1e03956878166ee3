"""The Milvus backend on a real Milvus standalone server (testkit/milvus.py:
`.venv-milvus`, or IMAGESEARCH_MILVUS_SERVER): what the ranker adds over
pymilvus on the same server and collection.

    .venv/bin/python -m bench.milvus                     # 100k x 512, Milvus's default 200 ms time tick
    .venv/bin/python -m bench.milvus --n 20000 --queries 50 --tick-ms 20   # quicker

(a) Upsert items/s: the whole gallery (clustered unit vectors) through the
    ranker's Upsert stream, against pymilvus inserting the same rows into a
    collection of the same schema in batches (`MilvusClient.insert`); both
    collections exist before the clock starts.
(b) Search p50/p99 for top-10: Search through the ranker (one gRPC call each)
    against pymilvus's own `search` on the same collection with the same
    consistency (Strong), the two interleaved per query in a random order.
    Target: the ranker at most 1.2x + 1 ms.

Prints a table and writes bench/results/milvus.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from imagesearch.v1 import ranker_pb2 as pb
from imagesearch.v1 import ranker_pb2_grpc
from testkit import ServiceProcess, unit32
from testkit.milvus import MilvusServer, find_server, missing_reason

RESULTS = Path(__file__).resolve().parent / "results" / "milvus.json"
FP = "sha256:bench"


def clustered(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    return unit32(centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim)))


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, p))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1024, help="ranker --batch-size and pymilvus insert batch")
    parser.add_argument("--tick-ms", type=int, default=200, help="the server's proxy.timeTickInterval")
    args = parser.parse_args()
    if find_server() is None:
        raise SystemExit(missing_reason())
    from pymilvus import MilvusClient

    vectors = clustered(args.n, args.dim, args.clusters)
    names = [f"g/{i:06d}.jpg" for i in range(args.n)]
    queries = clustered(args.queries, args.dim, args.clusters, seed=1)
    with tempfile.TemporaryDirectory(prefix="bench-milvus-") as tmp:
        server = MilvusServer(Path(tmp) / "milvus", tick_ms=args.tick_ms).start()
        try:
            client = MilvusClient(uri=server.uri)
            with ServiceProcess("ranker_service", "--backend", "milvus", "--milvus-uri", server.uri,
                                "--batch-size", args.batch, "--milvus-timeout", 120) as ranker, \
                    ranker.channel() as channel:
                stub = ranker_pb2_grpc.RankerServiceStub(channel)
                # (a) Upsert through the ranker, then pymilvus's insert into a twin collection;
                # both collections made first (making one takes seconds, once)
                stub.CreateCollection(pb.CreateCollectionRequest(collection="bench", dim=args.dim, fingerprint=FP),
                                      timeout=120)
                started = time.perf_counter()
                reply = stub.Upsert(iter(pb.UpsertRequest(collection="bench", name=n, vector=v, fingerprint=FP)
                                         for n, v in zip(names, vectors)), timeout=3600)
                ranker_upsert = args.n / (time.perf_counter() - started)
                assert reply.upserted == args.n
                from ranker_service.milvus.schema import collection_schema, milvus_name

                key = milvus_name("bench")
                twin = "bench_pymilvus"
                client.create_collection(twin, schema=collection_schema(args.dim),
                                         index_params=_index(client), consistency_level="Strong")
                client.load_collection(twin)
                now = time.time()
                started = time.perf_counter()
                for i in range(0, args.n, args.batch):
                    client.insert(twin, [{"name": n, "vector": v.tolist(), "created_at": now, "updated_at": now,
                                          "attributes": {}}
                                         for n, v in zip(names[i:i + args.batch], vectors[i:i + args.batch])])
                pymilvus_insert = args.n / (time.perf_counter() - started)
                # (b) Search: ranker and pymilvus on the ranker's collection, interleaved
                for q in queries[:5]:  # warm both paths
                    list(stub.Search(pb.SearchRequest(collection="bench", vector=q, top_k=10), timeout=60))
                    client.search(key, data=[q.tolist()], limit=10, consistency_level="Strong")
                times: dict[str, list[float]] = {"ranker": [], "pymilvus": []}
                for q in queries:
                    order = ["ranker", "pymilvus"]
                    random.shuffle(order)
                    for who in order:
                        started = time.perf_counter()
                        if who == "ranker":
                            got = [r.match.name for r in stub.Search(
                                pb.SearchRequest(collection="bench", vector=q, top_k=10), timeout=60)]
                        else:
                            (hits,) = client.search(key, data=[q.tolist()], limit=10, consistency_level="Strong",
                                                    search_params={"metric_type": "IP", "params": {}})
                            got = [h["id"] for h in hits]
                        times[who].append(time.perf_counter() - started)
                        assert len(got) == 10
                client.close()
        finally:
            server.stop()
    result = {
        "n": args.n, "dim": args.dim, "queries": args.queries, "tick_ms": args.tick_ms, "batch": args.batch,
        "upsert_items_s": {"ranker": ranker_upsert, "pymilvus_insert": pymilvus_insert},
        "search_ms": {who: {"p50": pct(t, 50), "p99": pct(t, 99)} for who, t in times.items()},
        "machine": platform.platform(), "cpus": __import__("os").cpu_count(),
    }
    r, m = result["search_ms"]["ranker"], result["search_ms"]["pymilvus"]
    result["target_met"] = r["p50"] <= 1.2 * m["p50"] + 1 and r["p99"] <= 1.2 * m["p99"] + 1
    print(f"| {args.n} x {args.dim} | ranker | pymilvus | ranker / pymilvus |")
    print("|---|---:|---:|---:|")
    for p in ("p50", "p99"):
        print(f"| Search {p} (ms) | {r[p]:.1f} | {m[p]:.1f} | {r[p] / m[p]:.2f}x (+{r[p] - m[p]:.1f} ms) |")
    u = result["upsert_items_s"]
    print(f"| Upsert (items/s) | {u['ranker']:.0f} | {u['pymilvus_insert']:.0f} | "
          f"{u['ranker'] / u['pymilvus_insert']:.2f}x |")
    print(f"target (ranker <= 1.2x + 1 ms at p50 and p99): {'met' if result['target_met'] else 'NOT met'}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))


def _index(client):
    index = client.prepare_index_params()
    index.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
    return index


if __name__ == "__main__":
    main()
