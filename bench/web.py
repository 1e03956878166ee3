"""What the web page's server adds to a search (docs/clients.md#the-web-page).

    python -m bench.web [--requests 50] [--top-k 10]

On the demo gallery (photos shipped with scikit-image and scikit-learn, indexed
into real embedder and ranker processes), each demo query photo searched two
ways, interleaved request by request: `POST /api/search` (multipart upload) to
`imagesearch web` run as its own process over HTTP with keep-alive, and the same
search through the client library directly (embed, then search with the
attributes). Target: the page's server adds at most 10 ms at p50.
Prints a table and writes it, with the command, to bench/results/web.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from clients import EmbedderClient, RankerClient  # noqa: E402
from clients.cli import demo  # noqa: E402
from clients.cli.jobs import index_folder  # noqa: E402
from testkit import ServiceProcess  # noqa: E402

COLLECTION = "demo"
TARGET_MS = 10.0
WARMUP = 5


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_web(embedder: str, ranker: str, gallery: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "web", "--embedder", embedder, "--ranker", ranker,
                             "--gallery", str(gallery), "--port", "0"],
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    found = re.search(r"search page: (http://\S+/)", line)
    if not found:
        proc.kill()
        raise RuntimeError(f"imagesearch web did not start: {line}{proc.stderr.read()}")
    return proc, found.group(1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=50, help="measured requests per mode (default %(default)s)")
    p.add_argument("--top-k", type=int, default=10)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        gallery, query, _, _ = demo.build(tmp)
        photos = [(q.name, q.read_bytes()) for q in sorted(query.iterdir())]
        embedder = ServiceProcess("embedder_service", "--backbone", "efficientnet_lite0", startup_timeout=300)
        ranker = ServiceProcess("ranker_service", "--db", Path(tmp) / "demo.db")
        web = None
        try:
            emb, rank = EmbedderClient(embedder.address), RankerClient(ranker.address)
            indexed = index_folder(emb, rank, gallery, collection=COLLECTION, progress=False)
            web, url = start_web(embedder.address, ranker.address, gallery)
            http = httpx.Client(base_url=url, timeout=60)

            def direct(name: str, data: bytes) -> list[str]:
                q = emb.embed(data, name)
                return [m.name for m in rank.search(COLLECTION, q.vector, top_k=args.top_k,
                                                    fingerprint=q.fingerprint, with_attributes=True)]

            def page(name: str, data: bytes) -> list[str]:
                r = http.post("/api/search", files={"image": (name, data, "image/jpeg")},
                              data={"collection": COLLECTION, "top_k": str(args.top_k)})
                r.raise_for_status()
                return [m["name"] for m in r.json()["matches"]]

            times: dict[str, list[float]] = {"client library": [], "POST /api/search": []}
            for i in range(WARMUP + args.requests):
                name, data = photos[i % len(photos)]
                answers = []
                for mode, search in (("client library", direct), ("POST /api/search", page))[::1 - 2 * (i % 2)]:
                    t = time.perf_counter()
                    answers.append(search(name, data))
                    if i >= WARMUP:
                        times[mode].append((time.perf_counter() - t) * 1e3)
                assert answers[0] == answers[1], (name, answers)
            http.close()
            emb.close()
            rank.close()
        finally:
            if web is not None:
                web.terminate()
                web.wait(10)
            ranker.terminate()
            embedder.terminate()
    rows = ["| path | requests | p50 ms | p90 ms | mean ms |", "|---|---:|---:|---:|---:|"]
    for mode, ms in times.items():
        rows.append(f"| {mode} | {len(ms)} | {percentile(ms, .5):.1f} | {percentile(ms, .9):.1f} | "
                    f"{statistics.fmean(ms):.1f} |")
    pairs = [w - d for d, w in zip(times["client library"], times["POST /api/search"])]
    added = percentile(times["POST /api/search"], .5) - percentile(times["client library"], .5)
    rows.append(f"| added by the page's server (p50 difference) | | {added:.1f} | | target <= {TARGET_MS:.0f} |")
    rows.append(f"| added, median of per-request differences | | {statistics.median(pairs):.1f} | | |")
    table = "\n".join(rows)
    command = "python -m bench.web " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"{indexed.done} gallery photos, {len(photos)} query photos, top {args.top_k}\n\n{table}")
    out = ROOT / "bench" / "results" / "web.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# The web page's server: latency it adds to a search\n\n```bash\n{command.strip()}\n```\n\n"
                   f"{indexed.done} demo gallery photos, {len(photos)} altered query photos cycled, top {args.top_k}, "
                   f"modes interleaved request by request ({WARMUP} warm-up requests each not counted); "
                   "efficientnet_lite0 on the CPU (one torch thread), the page's server on uvicorn over HTTP "
                   "with keep-alive, on the 2-core build machine shared with other jobs.\n\n"
                   f"{table}\n")
    print(f"\nwritten: {out.relative_to(ROOT)}")
    return 0 if added <= TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
