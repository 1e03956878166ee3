"""Abuse bench: a well-behaved client's latency and the server's
memory while 1,000 abusive streams of one kind are open.

For each service (an embedder and a ranker started here as real processes with
their default bounds and an auth token), first the good client alone (the
unloaded baseline), then each kind of abuse in turn (`testkit.abuse.KINDS`:
health Watch without a token; EmbedStream silent; EmbedStream sending 256 KB
images and never reading; Upsert silent; SearchStream silent; Search with
top_k=1000 never read; Backup never read), N streams at a
time while the good client keeps calling on its own connection. Prints p50/p99
per method, failed calls, Watch streams refused and RSS growth, and checks the
targets: no failed good call; p99 under 1 s for health, GetModelInfo, GetStats
and Search; Embed p99 within its unloaded p99 + 2 batch times; RSS growth under
300 MB.

    python -m bench.abuse --streams 1000 --seconds 20
"""

from __future__ import annotations

import os

# This process runs grpc.aio channels and then forks the next service: see tests/conftest.py.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path

import numpy as np

from testkit import abuse
from testkit import ServiceProcess, sample_photos
from imagesearch.v1 import ranker_pb2, ranker_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "abuse-bench-token"
FAST_METHODS = ("health.Check", "GetModelInfo", "GetStats", "Search")
P99_LIMIT_S = 1.0
RSS_LIMIT = 300 << 20


def fill_ranker(proc: ServiceProcess, n: int, dim: int = 1280, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    md = [("authorization", f"Bearer {TOKEN}")]
    with proc.channel() as channel:
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        requests = (ranker_pb2.UpsertRequest(collection="abuse", name=f"item-{i:06d}", vector=v.tolist())
                    for i, v in enumerate(vectors))
        stub.Upsert(requests, timeout=600, metadata=md)
    return rng.standard_normal(dim).astype(np.float32).tolist()


def targets(result: abuse.Result, baseline: abuse.Result, batch_s: float) -> list[str]:
    """What misses its target, in words (empty: all met)."""
    missed = []
    if result.failures:
        missed.append(f"{len(result.failures)} failed good calls (first: {result.failures[0]})")
    for method in FAST_METHODS:
        if method in result.latencies and result.pct(method, 99) >= P99_LIMIT_S:
            missed.append(f"{method} p99 {result.pct(method, 99):.3f} s >= {P99_LIMIT_S} s")
    if "Embed" in result.latencies and result.kind != "none":
        limit = baseline.pct("Embed", 99) + 2 * batch_s
        if result.pct("Embed", 99) > limit:
            missed.append(f"Embed p99 {result.pct('Embed', 99):.3f} s > unloaded p99 + 2 batches = {limit:.3f} s")
    if result.rss_growth >= RSS_LIMIT:
        missed.append(f"RSS grew {result.rss_growth / 2**20:.0f} MB >= {RSS_LIMIT >> 20} MB")
    return missed


def row(result: abuse.Result) -> str:
    methods = " ".join(f"{m} {result.pct(m, 50) * 1e3:.0f}/{result.pct(m, 99) * 1e3:.0f}"
                       for m in result.latencies)
    calls = sum(len(v) for v in result.latencies.values())
    return (f"| {result.service} | {result.kind} | {result.streams} | {calls} | {len(result.failures)} | "
            f"{methods} | {result.abusers_refused} | {result.rss_growth / 2**20:.0f} |")


def run_service(service: str, proc: ServiceProcess, args, photo: bytes, **kw) -> list[tuple[abuse.Result, list]]:
    out = []
    if service == "embedder" and not args.batch_seconds:
        args.batch_seconds = abuse.batch_seconds(proc.address, photo, [("authorization", f"Bearer {TOKEN}")])
        print(f"one batch of 32 on the idle embedder: {args.batch_seconds:.2f} s", flush=True)
    baseline = abuse.run(proc.address, service, "none", pid=proc.proc.pid, streams=0, seconds=args.seconds,
                         photo=photo, token=TOKEN, **kw)
    out.append((baseline, targets(baseline, baseline, args.batch_seconds)))
    print(row(baseline), flush=True)
    for kind in args.kinds or abuse.KINDS[service]:
        if kind not in abuse.KINDS[service]:
            continue
        result = abuse.run(proc.address, service, kind, pid=proc.proc.pid, streams=args.streams,
                           seconds=args.seconds, photo=photo, token=TOKEN, **kw)
        out.append((result, targets(result, baseline, args.batch_seconds)))
        print(row(result), flush=True)
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=1000, help="abusive streams of each kind (default %(default)s)")
    p.add_argument("--seconds", type=float, default=20.0, help="good client's run per kind (default %(default)s)")
    p.add_argument("--services", nargs="+", default=["embedder", "ranker"], choices=["embedder", "ranker"])
    p.add_argument("--kinds", nargs="+", default=None, help="only these kinds of abuse")
    p.add_argument("--gallery", type=int, default=10000, help="vectors in the ranker (default %(default)s)")
    p.add_argument("--batch-seconds", type=float, default=0.0,
                   help="one embedder batch's time, for the Embed target (default: timed on the idle embedder)")
    p.add_argument("--embedder-arg", action="append", default=[], metavar="ARG")
    p.add_argument("--ranker-arg", action="append", default=[], metavar="ARG")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "abuse.json")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    photo = sample_photos(1, max_side=512)[0]
    print("| service | abuse | streams | good calls | failed | p50/p99 ms per method | refused (Watch, EmbedStream) | "
          "RSS growth MB |\n|---|---|---:|---:|---:|---|---:|---:|", flush=True)
    results = []
    env = {"IMAGESEARCH_AUTH_TOKEN": TOKEN}
    with tempfile.TemporaryDirectory() as tmp:
        if "embedder" in args.services:
            with ServiceProcess("embedder_service", *args.embedder_arg, env=env, startup_timeout=600) as proc:
                results += run_service("embedder", proc, args, photo)
        if "ranker" in args.services:
            with ServiceProcess("ranker_service", "--db", Path(tmp) / "abuse.db", *args.ranker_arg, env=env) as proc:
                query = fill_ranker(proc, args.gallery)
                results += run_service("ranker", proc, args, photo, collection="abuse", query=query)
    missed = [(r, m) for r, m in results if m]
    for r, m in missed:
        print(f"MISSED {r.service} {r.kind}: {'; '.join(m)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([{
        "service": r.service, "kind": r.kind, "streams": r.streams, "failures": r.failures[:5],
        "p50": {k: r.pct(k, 50) for k in r.latencies}, "p99": {k: r.pct(k, 99) for k in r.latencies},
        "calls": {k: len(v) for k, v in r.latencies.items()}, "rss_growth": r.rss_growth,
        "watches_refused": r.abusers_refused, "missed": m} for r, m in results], indent=1))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
