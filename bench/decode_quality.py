"""Reduced JPEG decode vs full decode: retrieval quality on 12-megapixel photos.

    .venv/bin/python -m bench.decode_quality [--limit-queries N --limit-gallery N] [--engine onnxruntime]

clothing-small's photos (about 256 px) are too small for draft decode to change
anything, so each retrieval photo (query and gallery) is upscaled to 4000x3000
(bicubic) and saved as JPEG q90 (cached under bench/results/clothing-12mp/).
Both sets are embedded in-process with the same model (efficientnet_lite0,
ImageNet weights) twice: JPEGs decoded in full, and in draft mode (the
smallest DCT scale that covers the input size). Each query is ranked against
the gallery by cosine (ties by name, as the ranker breaks them) and scored
against ground_truth.json: mAP@10, P@10, recall@10, top-1. Also prints the
decode+preprocess time per image in each mode and the largest vector change.
Target: |P@10(draft) - P@10(full)| <= 0.005. Writes bench/results/decode_quality.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from clients import metrics  # noqa: E402
from embedder_service.embedder import Embedder  # noqa: E402
from imagesearch.model.checkpoint import load_model  # noqa: E402

DATA = Path(os.environ.get("IMAGESEARCH_CLOTHING_DIR", ROOT.parent / "shared" / "data" / "clothing-small"))
RESULTS = ROOT / "bench" / "results"


def upscaled(src: Path, dst: Path, size=(4000, 3000), quality: int = 90) -> Path:
    """`src` upscaled to `size` and saved as JPEG `quality` at `dst` (kept for later runs)."""
    if not dst.is_file():
        from PIL import Image

        with Image.open(src) as img:
            big = img.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        tmp = dst.with_suffix(".tmp")
        big.save(tmp, "JPEG", quality=quality)
        os.replace(tmp, dst)
    return dst


def embed_all(embedder: Embedder, paths: list[Path], workers: int) -> tuple[np.ndarray, float]:
    """Vectors of `paths` (decoded on `workers` threads, as the service does) and
    the decode+preprocess seconds per image of one thread."""
    def decode(path: Path):
        start = time.perf_counter()
        tensor = embedder.decode(path.read_bytes(), path.name)
        return tensor, time.perf_counter() - start

    with ThreadPoolExecutor(workers) as pool:
        decoded = list(pool.map(decode, paths))
    vectors = [embedder.embed_tensors([t for t, _ in decoded[i:i + 16]]) for i in range(0, len(decoded), 16)]
    return np.concatenate(vectors), sum(s for _, s in decoded) / len(decoded)


def rank(queries: np.ndarray, gallery: np.ndarray, gallery_names: list[str], k: int) -> list[list[str]]:
    """Top-k gallery names per query by cosine, ties broken by name (names sorted)."""
    order = np.argsort(gallery_names, kind="stable")
    scores = queries @ gallery[order].T
    names = [gallery_names[i] for i in order]
    return [[names[j] for j in np.argsort(-row, kind="stable")[:k]] for row in scores]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--engine", default="onnxruntime", help="in-process engine (fp32; default %(default)s)")
    p.add_argument("--limit-queries", type=int, default=0, help="first N queries only (0 = all)")
    p.add_argument("--limit-gallery", type=int, default=0, help="first N gallery photos only (0 = all)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode threads")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--cache", type=Path, default=RESULTS / "clothing-12mp")
    p.add_argument("--out", type=Path, default=RESULTS / "decode_quality.json")
    args = p.parse_args(argv)
    retrieval = args.data / "retrieval"
    if not (retrieval / "ground_truth.json").is_file():
        raise SystemExit(f"no clothing-small retrieval split at {retrieval} (pass --data)")
    truth = metrics.load_ground_truth(retrieval / "ground_truth.json")
    queries = sorted((retrieval / "query").glob("*.jpg"))[:args.limit_queries or None]
    gallery = sorted((retrieval / "gallery").glob("*.jpg"))[:args.limit_gallery or None]
    names = [g.name for g in gallery]
    truth = {q.name: [n for n in truth[q.name] if n in set(names)] for q in queries}

    started = time.monotonic()
    big = {}
    for split, paths in (("query", queries), ("gallery", gallery)):
        (args.cache / split).mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(args.workers) as pool:
            big[split] = list(pool.map(lambda s: upscaled(s, args.cache / split / s.name), paths))
    print(f"{len(queries)} queries, {len(gallery)} gallery photos at 4000x3000 JPEG q90 "
          f"({time.monotonic() - started:.0f}s to prepare; cache {args.cache})", flush=True)

    loaded = load_model()
    rows, vectors = [], {}
    for label, decode, sets in (("original ~256 px", "full", {"query": queries, "gallery": gallery}),
                                ("12 MP, full decode", "full", big), ("12 MP, draft decode", "draft", big)):
        spec = dataclasses.replace(loaded.spec, decode=decode)
        embedder = Embedder(dataclasses.replace(loaded, spec=spec), device="cpu", engine=args.engine)
        q, q_s = embed_all(embedder, sets["query"], args.workers)
        g, g_s = embed_all(embedder, sets["gallery"], args.workers)
        vectors[label] = (q, g)
        ev = metrics.evaluate(dict(zip([x.name for x in queries], rank(q, g, names, args.k))), truth, k=args.k)
        per_image = (q_s * len(queries) + g_s * len(gallery)) / (len(queries) + len(gallery))
        rows.append({"photos": label, "decode": decode, "map": ev.map, "precision": ev.precision,
                     "recall": ev.recall, "top1": ev.top1, "decode_ms_per_image": 1000 * per_image,
                     "fingerprint": embedder.info.fingerprint})
        print(f"  {label}: P@{args.k} {ev.precision:.4f}, decode {1000 * per_image:.0f} ms/image", flush=True)

    full_q, full_g = vectors["12 MP, full decode"]
    draft_q, draft_g = vectors["12 MP, draft decode"]
    change = float(max(np.abs(full_q - draft_q).max(), np.abs(full_g - draft_g).max()))
    cosine = float(min((full_q * draft_q).sum(1).min(), (full_g * draft_g).sum(1).min()))
    delta = rows[2]["precision"] - rows[1]["precision"]
    print()
    print(f"| photos | decode | mAP@{args.k} | P@{args.k} | R@{args.k} | top-1 | decode + preprocess ms/image |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['photos']} | {r['decode']} | {r['map']:.4f} | {r['precision']:.4f} | {r['recall']:.4f} "
              f"| {r['top1']:.4f} | {r['decode_ms_per_image']:.0f} |")
    print(f"\nP@{args.k} draft - full on 12 MP: {delta:+.4f} (target |change| <= 0.005: "
          f"{'met' if abs(delta) <= 0.005 else 'NOT met'}); largest vector change {change:.2e}, "
          f"lowest cosine(draft, full) {cosine:.4f}; decode {rows[1]['decode_ms_per_image'] / rows[2]['decode_ms_per_image']:.1f}x "
          f"faster in draft")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bench": "decode_quality", "queries": len(queries), "gallery": len(gallery),
                                    "k": args.k, "engine": args.engine, "rows": rows, "p_at_k_change": delta,
                                    "max_vector_change": change, "min_cosine": cosine}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
