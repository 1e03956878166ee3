"""Incremental index benchmark: re-indexing an unchanged gallery against the
first run, through the real `imagesearch index` command (a fresh process each
time, its start-up included) and real embedder and ranker processes.

    .venv/bin/python -m bench.incremental                       # 600 photos embedded, 10k re-indexed
    .venv/bin/python -m bench.incremental --first 2000 --gallery 10000

(a) First run: `index` of a gallery of --first photo files (clothing-small's
    JPEGs, copied in turn; the scikit-image / scikit-learn sample photos where
    it is absent): embeds and stores every file (and hashes it).
(b) Re-run of the same, unchanged gallery: nothing embedded, nothing hashed.
(c) The same re-run at --gallery files (10k by default), without embedding
    10k photos on this CPU first: the ranker is seeded with exactly the items
    a first run stores (each file's real sha256, size and mtime as
    attributes; a random unit vector under the embedder's fingerprint), then
    `index` is timed on it (and must report every file unchanged). Its first
    run is estimated from (a)'s seconds per image: a first run's cost is one
    embedding per image.

Prints a table and writes bench/results/incremental.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from clients.files import MTIME, SHA256, SIZE
from imagesearch.files import sha256_file
from clients.embedder import EmbedderClient
from clients.ranker import RankerClient
from clients.types import Embedding
from testkit import ServiceProcess, sample_photos, unit32

ROOT = Path(__file__).resolve().parents[1]
CLOTHING = Path(os.environ.get("IMAGESEARCH_CLOTHING_DIR", ROOT.parent / "shared" / "data" / "clothing-small"))
INDEXED = re.compile(r"indexed (\d+) of (\d+) images")
UNCHANGED = re.compile(r"(\d+) unchanged")


def source_photos() -> tuple[str, list[bytes]]:
    files = sorted(CLOTHING.rglob("*.jpg")) if CLOTHING.is_dir() else []
    if files:
        return f"clothing-small ({len(files)} JPEG files, copied in turn)", [p.read_bytes() for p in files]
    return "library sample photos (clothing-small absent)", sample_photos(64, max_side=400)


def make_gallery(folder: Path, n: int, photos: list[bytes]) -> None:
    for i in range(n):
        path = folder / f"{i // 1000:02d}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(photos[i % len(photos)])


def index(gallery: Path, embedder: str, ranker: str, collection: str) -> tuple[float, str]:
    """One `imagesearch index` process: (seconds, its stderr)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "clients.cli", "index", str(gallery), "--embedder", embedder,
                           "--ranker", ranker, "--collection", collection, "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"index failed ({proc.returncode}):\n{proc.stderr}")
    return seconds, proc.stderr


def counts(stderr: str) -> tuple[int, int, int]:
    """(embedded, total, unchanged) from index's summary."""
    m, u = INDEXED.search(stderr), UNCHANGED.search(stderr)
    return int(m.group(1)), int(m.group(2)), int(u.group(1))


def seed(ranker: RankerClient, collection: str, gallery: Path, dim: int, fingerprint: str) -> int:
    """The items a first run of `index` stores, with random vectors."""
    rng = np.random.default_rng(0)
    items, attributes = [], {}
    for path in sorted(gallery.rglob("*.jpg")):
        name = path.relative_to(gallery).as_posix()
        st = path.stat()
        attributes[name] = {SHA256: sha256_file(path), SIZE: str(st.st_size), MTIME: str(st.st_mtime_ns)}
        items.append(Embedding(name, unit32(rng.standard_normal(dim)), fingerprint))
    return ranker.upsert(collection, items, attributes=attributes.get, timeout=600).upserted


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--first", type=int, default=600, help="photos of the embedded first run (default %(default)s)")
    p.add_argument("--gallery", type=int, default=10000, help="files of the seeded re-run (default %(default)s)")
    p.add_argument("--torch-threads", default="2")
    args = p.parse_args(argv)
    what, photos = source_photos()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-incremental-") as tmp:
        tmp = Path(tmp)
        embedder = ServiceProcess("embedder_service", "--backbone", "efficientnet_lite0",
                                  env={"IMAGESEARCH_TORCH_THREADS": args.torch_threads})
        ranker = ServiceProcess("ranker_service", "--db", str(tmp / "g.db"))
        try:
            small, big = tmp / "small", tmp / "big"
            make_gallery(small, args.first, photos)
            make_gallery(big, args.gallery, photos)
            first_s, out = index(small, embedder.address, ranker.address, "first")
            assert counts(out) == (args.first, args.first, 0), out
            again_s, out = index(small, embedder.address, ranker.address, "first")
            assert counts(out) == (0, args.first, args.first), out
            per_image = first_s / args.first
            rows.append((f"(a) first run, {args.first} photos (s)", first_s, 1.0))
            rows.append((f"(b) re-run, unchanged, {args.first} photos (s)", again_s, again_s / first_s))
            with EmbedderClient(embedder.address) as emb, RankerClient(ranker.address) as rank:
                info = emb.model_info()
                seeded = seed(rank, "big", big, info.dim, info.fingerprint)
            assert seeded == args.gallery
            big_s, out = index(big, embedder.address, ranker.address, "big")
            assert counts(out) == (0, args.gallery, args.gallery), out
            est = per_image * args.gallery
            rows.append((f"(c) first run, {args.gallery} photos, estimated from (a) (s)", est, 1.0))
            rows.append((f"(c) re-run, unchanged, {args.gallery} photos (s)", big_s, big_s / est))
        finally:
            ranker.terminate()
            embedder.terminate()
    print(f"efficientnet_lite0 on CPU ({args.torch_threads} torch threads), {what}, {platform.node()}")
    print("| measure | seconds | ratio to the first run | target |\n|---|---:|---:|---:|")
    for label, seconds, ratio in rows:
        target = "< 0.05" if "re-run" in label else ""
        print(f"| {label} | {seconds:.2f} | {ratio:.4f} | {target} |")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "incremental.json").write_text(json.dumps(
        {"photos": what, "rows": [{"measure": m, "seconds": s, "ratio": r} for m, s, r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
