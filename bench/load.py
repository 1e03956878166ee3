"""Load: both services as real processes, driven by many concurrent clients.

    .venv/bin/python -m bench.load [--clients 256] [--seconds 30] [--mix embed=1,search=1]

Starts an embedder and a ranker as child processes on port 0 (through
`clients.cli.services`, the CLI's own launcher; or uses running ones given with
--embedder / --ranker), then:

1. prepares the work: real photos (scikit-image / scikit-learn samples, as
   JPEG) each embedded once by a single Embed call (the expected vectors), and
   a gallery of random unit vectors (plus those photo vectors) upserted into
   the ranker under the model's fingerprint, with a float64 numpy reference
   ranking for every query vector;
2. runs --clients closed-loop client threads for --seconds, each with its own
   `EmbedderClient` and `RankerClient` (its own channels): every request is
   Embed (one photo -> its vector) or Search (one query vector -> top-k),
   drawn at random by the --mix weights;
3. checks every answer: an Embed vector must equal the single-call vector
   within 1e-5 (max abs difference) with the same fingerprint, a Search must
   return the reference ranking (names in order, scores within 1e-5);
4. prints requests/s, p50 and p99 latency per kind, errors and wrong answers
   as a table, and writes bench/results/load.json.

With --answers FILE.npz it also writes the workload and every answer, so that
tests/test_load.py can run this command as a process and check each answer
independently.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from clients.embedder import EmbedderClient  # noqa: E402
from clients.errors import ClientError  # noqa: E402
from clients.ranker import RankerClient  # noqa: E402
from clients.cli.services import EMBEDDER_MODULE, RANKER_MODULE, Services, embedder_args  # noqa: E402
from testkit import reference_ranking, sample_photos, unit32  # noqa: E402

KINDS = ("embed", "search")
TOLERANCE = 1e-5
COLLECTION = "load"
UPSERT_CHUNK = 1000


# ---------------------------------------------------------------- services


@contextlib.contextmanager
def start_services(workdir: str | os.PathLike, *, backbone: str | None = None, checkpoint: str | None = None,
                   device: str | None = None, torch_threads: int | None = None,
                   embedder_extra: Sequence[str] = (), ranker_extra: Sequence[str] = (),
                   echo=None, start_timeout: float = 600.0) -> Iterator[tuple[str, str]]:
    """An embedder and a ranker (database under `workdir`) as child processes
    on port 0; yields their addresses; stops both (SIGTERM) at the end."""
    env = {"IMAGESEARCH_TORCH_THREADS": str(torch_threads)} if torch_threads else {}
    with Services() as services:
        emb = services.start("embedder", EMBEDDER_MODULE,
                             [*embedder_args(checkpoint=checkpoint, backbone=backbone, device=device),
                              *embedder_extra], env=env, echo=echo)
        rank = services.start("ranker", RANKER_MODULE, ["--db", str(Path(workdir) / "load.db"), *ranker_extra],
                              echo=echo)
        services.wait_ready(start_timeout)
        yield emb.address, rank.address


# ---------------------------------------------------------------- the work


@dataclasses.dataclass
class Workload:
    collection: str
    fingerprint: str
    dim: int
    top_k: int
    images: list[bytes]
    image_vectors: np.ndarray          # (n_images, dim): each from one Embed call alone
    gallery_names: list[str]
    gallery_vectors: np.ndarray        # (n_gallery, dim) float32, as sent to Upsert
    queries: np.ndarray                # (n_queries, dim) float32
    expected_names: list[list[str]]    # reference ranking per query
    expected_scores: list[list[float]]


def prepare(embedder_address: str, ranker_address: str, *, images: int = 16, gallery: int = 10000,
            queries: int = 64, top_k: int = 10, seed: int = 0, collection: str = COLLECTION,
            timeout: float = 120.0) -> Workload:
    """Expected Embed answers (one call per photo, nothing else running) and a
    gallery in the ranker with the reference ranking of every query."""
    rng = np.random.default_rng(seed)
    photos = sample_photos(images)
    with EmbedderClient(embedder_address, timeout=timeout) as emb, \
            RankerClient(ranker_address, timeout=timeout) as rank:
        emb.wait_ready()
        rank.wait_ready()
        info = emb.model_info()
        singles = [emb.embed(data, name=f"photo-{i}") for i, data in enumerate(photos)]
        image_vectors = np.stack([r.vector for r in singles])
        if {r.fingerprint for r in singles} != {info.fingerprint}:
            raise RuntimeError("the embedder answered with a fingerprint other than GetModelInfo's")
        # The gallery: the photos' own vectors (so Search meets real vectors
        # too) and random unit vectors, under shuffled names.
        random_rows = max(0, gallery - len(photos))
        vectors = np.concatenate([image_vectors, rng.standard_normal((random_rows, info.dim))]).astype(np.float32)
        names = [f"photo/{i:03d}.jpg" for i in range(len(photos))] + [f"random/{i:06d}.jpg"
                                                                        for i in range(random_rows)]
        order = rng.permutation(len(names))
        names = [names[i] for i in order]
        vectors = vectors[order]
        for start in range(0, len(names), UPSERT_CHUNK):
            stop = start + UPSERT_CHUNK
            rank.upsert(collection, zip(names[start:stop], vectors[start:stop]), fingerprint=info.fingerprint)
        (stats,) = rank.stats(collection).collections
        if stats.count != len(names):
            raise RuntimeError(f"collection {collection!r} holds {stats.count} vectors, not {len(names)}: "
                               "use a fresh ranker (or another --collection)")
    # Queries: the photos' vectors, slightly moved copies of gallery rows, random directions.
    n_q = max(1, queries)
    picks = rng.integers(0, len(names), n_q)
    noisy = vectors[picks] + 0.05 * rng.standard_normal((n_q, info.dim)).astype(np.float32)
    query_vectors = np.concatenate([image_vectors, noisy, rng.standard_normal((n_q, info.dim))])
    query_vectors = query_vectors[rng.permutation(len(query_vectors))[:n_q]].astype(np.float32)
    stored = unit32(vectors)
    refs = [reference_ranking(stored, names, q, top_k) for q in query_vectors]
    return Workload(collection, info.fingerprint, int(info.dim), top_k, photos, image_vectors, names, vectors,
                    query_vectors, [r[0] for r in refs], [r[1] for r in refs])


# ---------------------------------------------------------------- the load


def parse_mix(text: str) -> dict[str, float]:
    """'embed=1,search=3' -> {'embed': 1.0, 'search': 3.0}."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, weight = part.partition("=")
        kind = kind.strip().lower()
        if kind not in KINDS or not sep:
            raise argparse.ArgumentTypeError(f"bad --mix entry {part!r}: use KIND=WEIGHT with KIND in {KINDS}")
        try:
            mix[kind] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad weight in --mix entry {part!r}") from None
        if mix[kind] < 0:
            raise argparse.ArgumentTypeError(f"negative weight in --mix entry {part!r}")
    if not mix or sum(mix.values()) <= 0:
        raise argparse.ArgumentTypeError(f"--mix {text!r} gives no request kind a positive weight")
    return mix


@dataclasses.dataclass
class Call:
    kind: str
    item: int            # photo index (embed) or query index (search)
    started: float       # seconds since the load began
    latency: float       # seconds
    outcome: str         # "ok", "error" or "wrong"
    detail: str = ""
    answer: object = None  # kept with keep_answers: the vector, or [(name, score), ...]


@dataclasses.dataclass
class LoadResult:
    clients: int
    seconds: float       # asked for
    elapsed: float       # from the first request to the last answer
    mix: dict[str, float]
    calls: list[Call]

    def of(self, kind: str) -> list[Call]:
        return [c for c in self.calls if c.kind == kind]

    @property
    def errors(self) -> list[Call]:
        return [c for c in self.calls if c.outcome == "error"]

    @property
    def wrong(self) -> list[Call]:
        return [c for c in self.calls if c.outcome == "wrong"]


def check_embed(workload: Workload, item: int, vector: np.ndarray, fingerprint: str) -> str:
    """'' when right, else what is wrong."""
    want = workload.image_vectors[item]
    if vector.shape != want.shape:
        return f"photo {item}: vector of shape {vector.shape}, expected {want.shape}"
    if fingerprint != workload.fingerprint:
        return f"photo {item}: fingerprint {fingerprint[:12]} differs from {workload.fingerprint[:12]}"
    diff = float(np.abs(vector - want).max())
    if not diff <= TOLERANCE:
        return f"photo {item}: max abs difference {diff:.2e} from the single-call vector"
    return ""


def check_search(workload: Workload, item: int, matches) -> str:
    names = [m.name for m in matches]
    if names != workload.expected_names[item]:
        return f"query {item}: ranking {names[:3]}... differs from the reference {workload.expected_names[item][:3]}..."
    if [m.rank for m in matches] != list(range(1, len(matches) + 1)):
        return f"query {item}: ranks {[m.rank for m in matches]} are not 1..{len(matches)}"
    diff = float(np.abs(np.array([m.score for m in matches]) - workload.expected_scores[item]).max(initial=0.0))
    if not diff <= TOLERANCE:
        return f"query {item}: scores differ from the reference by up to {diff:.2e}"
    return ""


def run_load(embedder_address: str, ranker_address: str, workload: Workload, *, clients: int = 32,
             seconds: float = 30.0, mix: dict[str, float] | None = None, seed: int = 0, timeout: float = 120.0,
             keep_answers: bool = False) -> LoadResult:
    """`clients` threads, each with its own channels, each calling in a closed
    loop (the next request when the previous answer is in) until `seconds`
    have passed; every answer is checked against the workload's expectations."""
    mix = dict(mix or {"embed": 1.0, "search": 1.0})
    kinds = [k for k in KINDS if mix.get(k, 0) > 0]
    weights = [mix[k] for k in kinds]
    calls: list[list[Call]] = [[] for _ in range(clients)]
    failures: list[BaseException] = []
    start_box: list[float] = []
    # Everyone connected and ready; the clock starts as the barrier opens.
    ready = threading.Barrier(clients + 1, action=lambda: start_box.append(time.perf_counter()))

    def client(i: int) -> None:
        rng = random.Random(seed * 1_000_003 + i)
        mine = calls[i]
        try:
            with EmbedderClient(embedder_address, timeout=timeout) as emb, \
                    RankerClient(ranker_address, timeout=timeout) as rank:
                emb.wait_ready()
                rank.wait_ready()
                ready.wait()
                t0 = start_box[0]
                end = t0 + seconds
                while True:
                    now = time.perf_counter()
                    if now >= end:
                        break
                    kind = rng.choices(kinds, weights)[0]
                    if kind == "embed":
                        item = rng.randrange(len(workload.images))
                    else:
                        item = rng.randrange(len(workload.queries))
                    begun = time.perf_counter()
                    answer = None
                    try:
                        if kind == "embed":
                            result = emb.embed(workload.images[item], name=f"photo-{item}")
                            latency = time.perf_counter() - begun
                            problem = check_embed(workload, item, result.vector, result.fingerprint)
                            answer = result.vector
                        else:
                            matches = rank.search(workload.collection, workload.queries[item], top_k=workload.top_k,
                                                  fingerprint=workload.fingerprint)
                            latency = time.perf_counter() - begun
                            problem = check_search(workload, item, matches)
                            answer = [(m.name, m.score) for m in matches]
                        outcome = "wrong" if problem else "ok"
                    except ClientError as exc:
                        latency = time.perf_counter() - begun
                        outcome = "error"
                        problem = f"{exc.code.name if exc.code else 'ERROR'}: {exc}"
                    mine.append(Call(kind, item, begun - t0, latency, outcome, problem,
                                     answer if keep_answers else None))
        except BaseException as exc:  # reported by the caller: a client that broke is not a quiet zero
            failures.append(exc)
            with contextlib.suppress(threading.BrokenBarrierError):
                ready.abort()

    threads = [threading.Thread(target=client, args=(i,), name=f"load-client-{i}", daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} load clients failed; the first: {failures[0]!r}") from failures[0]
    flat = [c for per_client in calls for c in per_client]
    elapsed = max((c.started + c.latency for c in flat), default=0.0)
    return LoadResult(clients, seconds, elapsed, mix, flat)


# ---------------------------------------------------------------- report


def _pct(values: Sequence[float], p: float) -> float:
    return float(np.percentile(np.asarray(values), p)) if len(values) else float("nan")


def summarize(result: LoadResult) -> dict:
    rows = {}
    for kind in (*KINDS, "all"):
        calls = result.calls if kind == "all" else result.of(kind)
        if kind != "all" and not calls and result.mix.get(kind, 0) <= 0:
            continue
        latencies = [c.latency for c in calls if c.outcome != "error"]
        rows[kind] = {
            "requests": len(calls),
            "requests_per_s": len(calls) / result.elapsed if result.elapsed else 0.0,
            "p50_ms": 1000 * _pct(latencies, 50),
            "p99_ms": 1000 * _pct(latencies, 99),
            "errors": sum(c.outcome == "error" for c in calls),
            "wrong": sum(c.outcome == "wrong" for c in calls),
        }
    return rows


def format_table(rows: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines += ["| kind   | requests | requests/s | p50 ms | p99 ms | errors | wrong answers |",
              "|--------|---------:|-----------:|-------:|-------:|-------:|--------------:|"]
    names = {"embed": "Embed", "search": "Search", "all": "all"}
    for kind, r in rows.items():
        lines.append(f"| {names[kind]:<6} | {r['requests']:>8} | {r['requests_per_s']:>10.1f} | {r['p50_ms']:>6.1f} "
                     f"| {r['p99_ms']:>6.1f} | {r['errors']:>6} | {r['wrong']:>13} |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=256, help="concurrent client threads (default %(default)s)")
    p.add_argument("--seconds", type=float, default=30.0, help="how long the load runs (default %(default)s)")
    p.add_argument("--mix", type=parse_mix, default=parse_mix("embed=1,search=1"),
                   help="request kinds and their weights, e.g. embed=1,search=3 (default embed=1,search=1)")
    p.add_argument("--gallery", type=int, default=10000, help="vectors in the ranker's collection (default %(default)s)")
    p.add_argument("--queries", type=int, default=64, help="distinct Search query vectors (default %(default)s)")
    p.add_argument("--images", type=int, default=16, help="distinct photos for Embed (default %(default)s)")
    p.add_argument("--top-k", type=int, default=10, help="(default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--collection", default=COLLECTION, help="the ranker collection to fill (default %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline of each call (default %(default)s)")
    g = p.add_argument_group("services (default: start both here, on port 0)")
    g.add_argument("--embedder", help="use a running embedder at HOST:PORT instead")
    g.add_argument("--ranker", help="use a running ranker at HOST:PORT instead (fills --collection there)")
    g.add_argument("--backbone", default=None, help="for the embedder started here (default efficientnet_lite0)")
    g.add_argument("--checkpoint", default=None, help="a trainer checkpoint for the embedder started here")
    g.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"))
    g.add_argument("--torch-threads", type=int, default=None,
                   help="IMAGESEARCH_TORCH_THREADS for the embedder started here (default: torch's own)")
    g.add_argument("--embedder-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for the embedder started here (repeat), e.g. --embedder-arg=--max-batch=16")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    p.add_argument("--answers", type=Path, default=None, metavar="FILE.npz",
                   help="also write the workload and every answer here, for a check outside the bench")
    return p


def write_answers(path: Path, workload: Workload, result: LoadResult) -> None:
    """The workload (gallery, queries) and every call's answer, as arrays."""
    embeds = [c for c in result.calls if c.kind == "embed" and c.outcome != "error"]
    searches = [c for c in result.calls if c.kind == "search" and c.outcome != "error"]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, fingerprint=np.array(workload.fingerprint), collection=np.array(workload.collection),
             gallery_names=np.array(workload.gallery_names), gallery_vectors=workload.gallery_vectors,
             queries=workload.queries, top_k=np.array(workload.top_k),
             embed_items=np.array([c.item for c in embeds], dtype=np.int64),
             embed_vectors=np.array([c.answer for c in embeds], dtype=np.float32).reshape(len(embeds), workload.dim),
             search_items=np.array([c.item for c in searches], dtype=np.int64),
             search_names=np.array([[n for n, _ in c.answer] for c in searches], dtype=str).reshape(len(searches), -1),
             search_scores=np.array([[s for _, s in c.answer] for c in searches], dtype=np.float64).reshape(
                 len(searches), -1))


def main(argv: Sequence[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.gallery < 1 or args.images < 1:
        raise SystemExit("error: --clients, --seconds, --gallery and --images must be positive")
    if bool(args.embedder) != bool(args.ranker):
        raise SystemExit("error: give both --embedder and --ranker (running services), or neither (started here)")
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        emb, rank = args.embedder, args.ranker
        if not emb:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="imagesearch-load-"))
            emb, rank = stack.enter_context(start_services(
                workdir, backbone=args.backbone, checkpoint=args.checkpoint, device=args.device,
                torch_threads=args.torch_threads, embedder_extra=args.embedder_arg))
        t0 = time.perf_counter()
        workload = prepare(emb, rank, images=args.images, gallery=args.gallery, queries=args.queries,
                           top_k=args.top_k, seed=args.seed, collection=args.collection, timeout=args.timeout)
        prepare_s = time.perf_counter() - t0
        with EmbedderClient(emb) as client:
            info = client.model_info()
        result = run_load(emb, rank, workload, clients=args.clients, seconds=args.seconds, mix=args.mix,
                          seed=args.seed, timeout=args.timeout, keep_answers=args.answers is not None)
    load_after = os.getloadavg()
    rows = summarize(result)
    mix = ",".join(f"{k}={v:g}" for k, v in args.mix.items())
    title = (f"{args.clients} clients for {args.seconds:g} s, mix {mix}; {info.backbone} on {info.device}; "
             f"gallery {len(workload.gallery_names)} x {workload.dim}, top_k {args.top_k}; "
             f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    text = format_table(rows, title)
    print(text)
    for call in (result.errors + result.wrong)[:5]:
        print(f"  {call.kind} {call.outcome}: {call.detail}")
    results = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"backbone": info.backbone, "device": info.device, "dim": info.dim, "weights": info.weights,
                  "fingerprint": info.fingerprint},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_before": load_before, "load_average_after": load_after},
        "prepare_s": prepare_s, "elapsed_s": result.elapsed, "rows": rows,
        "error_examples": [c.detail for c in result.errors[:10]],
        "wrong_examples": [c.detail for c in result.wrong[:10]],
        "table": text,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    if args.answers:
        write_answers(args.answers, workload, result)
        print(f"wrote {args.answers}")
    return results


if __name__ == "__main__":
    main()
