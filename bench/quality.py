"""Search quality on clothing-small: off-the-shelf ImageNet features vs the
fine-tuned checkpoint of the same backbone, through the real services.

    .venv/bin/python bench/quality.py [--checkpoint runs/clothing-lite0/best.pt] [--train]

For each model the bench starts an embedder process (and one ranker process
for both, a temporary SQLite file), indexes retrieval/gallery, queries
retrieval/query, and scores the results against retrieval/ground_truth.json:
mAP@k, precision@k, recall@k, top-1. With --train it first fine-tunes the
checkpoint with `python -m trainer` (Lite0, ImageNet-pretrained, 3 epochs).
Prints a table and writes bench/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clients import metrics  # noqa: E402
from clients.cli.jobs import index_folder, query_folder  # noqa: E402
from clients.embedder import EmbedderClient  # noqa: E402
from clients.errors import ClientError  # noqa: E402
from clients.ranker import RankerClient  # noqa: E402
from clients.services import EMBEDDER_MODULE, RANKER_MODULE, Services, embedder_args  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("IMAGESEARCH_CLOTHING_DIR", ROOT.parent / "shared" / "data" / "clothing-small"))
DEFAULT_CHECKPOINT = ROOT / "runs" / "clothing-lite0" / "best.pt"
RESULTS = ROOT / "bench" / "results" / "quality.json"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="clothing-small folder (train/ val/ retrieval/) (default %(default)s)")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="fine-tuned checkpoint (default %(default)s)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone of the off-the-shelf row (default %(default)s)")
    p.add_argument("--train", action="store_true", help="fine-tune --checkpoint first with `python -m trainer`")
    p.add_argument("--epochs", type=int, default=3, help="epochs for --train (default %(default)s)")
    p.add_argument("--k", type=int, default=10, help="metrics cut-off and top-k (default %(default)s)")
    p.add_argument("--device", default=None, help="embedder device: auto | cpu | cuda")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results (default %(default)s)")
    return p


def train(args) -> None:
    run_dir = args.checkpoint.parent
    command = [sys.executable, "-m", "trainer", "--data", str(args.data), "--out", str(run_dir),
               "--backbone", args.backbone, "--weights", "imagenet", "--epochs", str(args.epochs)]
    if args.device:
        command += ["--device", args.device]
    print("training:", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    if not args.checkpoint.is_file():
        raise SystemExit(f"the trainer finished but {args.checkpoint} is not there; see {run_dir}")


def measure(label: str, emb_args: list[str], ranker: RankerClient, services: Services, retrieval: Path,
            truth: dict, k: int) -> dict:
    """Start an embedder with `emb_args`, index, query, evaluate, stop it."""
    t0 = time.monotonic()
    child = services.start(f"embedder ({label})", EMBEDDER_MODULE, emb_args)
    child.wait_ready(600)
    started_s = time.monotonic() - t0
    try:
        with EmbedderClient(child.address, timeout=60) as emb:
            info = emb.model_info()
            collection = f"clothing-{label}"
            indexed = index_folder(emb, ranker, retrieval / "gallery", collection=collection, progress=False)
            if indexed.failed:
                raise ClientError(f"{label}: {len(indexed.failed)} gallery images not indexed: {indexed.failed}")
            answered = query_folder(emb, ranker, retrieval / "query", collection=collection, top_k=k, progress=False)
            if answered.failed:
                raise ClientError(f"{label}: {len(answered.failed)} queries not answered: {answered.failed}")
    finally:
        child.stop()
        services.children.remove(child)
    ev = metrics.evaluate(answered.names(), truth, k=k)
    return {
        "model": label, "backbone": info.backbone, "weights": info.weights, "fingerprint": info.fingerprint,
        "device": info.device, "queries": ev.queries, "gallery": indexed.done,
        f"map@{k}": ev.map, f"precision@{k}": ev.precision, f"recall@{k}": ev.recall, "top1": ev.top1,
        "start_s": started_s, "index_s": indexed.seconds, "query_s": answered.seconds,
    }


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    retrieval = args.data / "retrieval"
    if not (retrieval / "ground_truth.json").is_file():
        raise SystemExit(f"no clothing-small retrieval split at {retrieval} (pass --data)")
    if args.train:
        train(args)
    if not args.checkpoint.is_file():
        raise SystemExit(f"checkpoint {args.checkpoint} not found: train it with --train "
                         f"(or pass --checkpoint)")
    truth = metrics.load_ground_truth(retrieval / "ground_truth.json")
    k = args.k
    rows = []
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp, Services() as services:
        ranker_child = services.start("ranker", RANKER_MODULE, ["--db", str(Path(tmp) / "quality.db")])
        ranker_child.wait_ready(120)
        with RankerClient(ranker_child.address, timeout=60) as ranker:
            device = {"device": args.device} if args.device else {}
            rows.append(measure("off-the-shelf", embedder_args(backbone=args.backbone, **device), ranker, services,
                                retrieval, truth, k))
            rows.append(measure("fine-tuned", embedder_args(checkpoint=str(args.checkpoint), **device), ranker,
                                services, retrieval, truth, k))

    cols = [f"map@{k}", f"precision@{k}", f"recall@{k}", "top1"]
    print(f"\nclothing-small retrieval: {rows[0]['queries']} queries, {rows[0]['gallery']} gallery images, "
          f"k={k}, through the embedder and ranker services")
    print(f"{'model':<14} {'weights':<34} " + " ".join(f"{c:>13}" for c in cols) + f" {'index s':>8} {'query s':>8}")
    for r in rows:
        weights = r["weights"] if len(r["weights"]) <= 34 else "..." + r["weights"][-31:]
        print(f"{r['model']:<14} {weights:<34} " + " ".join(f"{r[c]:>13.4f}" for c in cols)
              + f" {r['index_s']:>8.1f} {r['query_s']:>8.1f}")
    ratio = {c: (rows[1][c] / rows[0][c] if rows[0][c] else float("nan")) for c in cols}
    print(f"{'ratio ft/ots':<14} {'':<34} " + " ".join(f"{ratio[c]:>13.3f}" for c in cols))
    target = rows[1][f"precision@{k}"] >= 0.80
    print(f"target fine-tuned precision@10 >= 0.80: {'met' if target else 'NOT met'} "
          f"({rows[1][f'precision@{k}']:.4f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "bench": "quality", "data": str(args.data), "k": k, "checkpoint": str(args.checkpoint),
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "rows": rows, "ratio_fine_tuned_over_off_the_shelf": ratio,
    }, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
