"""int8 static quantisation (onnxruntime) against fp32: speed and P@10 on clothing-small.

    .venv/bin/python -m bench.int8 [--calibration DATA/val] [--batch 8] [--repeats 5]

Both engines in-process, same model (efficientnet_lite0, ImageNet weights): the int8
model calibrated on --calibration (default clothing-small's val/, which the retrieval
split does not contain). Quality: the retrieval split ranked by cosine and scored
against ground_truth.json. Speed: the forward pass alone at --batch on decoded
gallery photos, the two engines interleaved in each of --repeats rounds (the machine
is shared: the per-round ratio counts). Writes bench/results/int8.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.decode_quality import DATA, RESULTS, rank  # noqa: E402
from clients import metrics  # noqa: E402
from embedder_service.embedder import Embedder  # noqa: E402
from imagesearch.model.checkpoint import load_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--calibration", type=Path, default=None, help="calibration folder (default DATA/val)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--engine-cache", default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "int8.json")
    args = p.parse_args(argv)
    retrieval = args.data / "retrieval"
    truth = metrics.load_ground_truth(retrieval / "ground_truth.json")
    queries = sorted((retrieval / "query").glob("*.jpg"))
    gallery = sorted((retrieval / "gallery").glob("*.jpg"))
    names = [g.name for g in gallery]
    loaded = load_model()
    started = time.monotonic()
    fp32 = Embedder(loaded, device="cpu", engine="onnxruntime", cache_dir=args.engine_cache)
    int8 = Embedder(loaded, device="cpu", engine="onnxruntime", cache_dir=args.engine_cache,
                    int8_calibration=args.calibration or args.data / "val")
    print(f"engines ready in {time.monotonic() - started:.0f}s (quantisation included on a first run)", flush=True)
    tensors = {p: fp32.decode(p.read_bytes(), p.name) for p in queries + gallery}
    rows = {}
    for label, embedder in (("onnxruntime fp32", fp32), ("onnxruntime int8", int8)):
        q = embedder.embed_tensors([tensors[p] for p in queries])
        g = np.concatenate([embedder.embed_tensors([tensors[p] for p in gallery[i:i + 64]])
                            for i in range(0, len(gallery), 64)])
        ev = metrics.evaluate(dict(zip([x.name for x in queries], rank(q, g, names, 10))), truth, k=10)
        rows[label] = {"engine": label, "fingerprint": embedder.info.fingerprint, "map": ev.map,
                       "precision": ev.precision, "top1": ev.top1, "times": []}
    batch = torch.stack([tensors[p] for p in gallery[:args.batch]])
    rounds = max(1, 96 // args.batch)
    for _ in range(args.repeats):
        for label, embedder in (("onnxruntime fp32", fp32), ("onnxruntime int8", int8)):
            start = time.perf_counter()
            for _ in range(rounds):
                embedder.engine(batch)
            rows[label]["times"].append((time.perf_counter() - start) / (rounds * args.batch))
    base = rows["onnxruntime fp32"]
    print(f"\n| engine | P@10 | mAP@10 | top-1 | forward images/s at batch {args.batch} (median) | speed-up, per round |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows.values():
        speed = statistics.median(b / t for b, t in zip(base["times"], row["times"]))
        row["images_per_s"] = 1 / statistics.median(row["times"])
        row["speedup"] = speed
        print(f"| {row['engine']} | {row['precision']:.4f} | {row['map']:.4f} | {row['top1']:.4f} "
              f"| {row['images_per_s']:.1f} | {speed:.2f} |")
    delta = rows["onnxruntime int8"]["precision"] - base["precision"]
    print(f"\nP@10 int8 - fp32: {delta:+.4f} (target |change| <= 0.01: {'met' if abs(delta) <= 0.01 else 'NOT met'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bench": "int8", "batch": args.batch, "rows": list(rows.values()),
                                    "p_at_10_change": delta}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
