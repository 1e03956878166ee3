"""Search quality on clothing-small, per training option, through the real services.

    python bench/quality.py [--options off-the-shelf,seed,default,...] [--train] [--epochs 3]

Rows (each a model served by a fresh embedder process; one ranker process,
a temporary SQLite file; retrieval/gallery indexed, retrieval/query asked,
scored against retrieval/ground_truth.json with the project's metrics). A row
is a base, optionally followed by modifiers joined with "+" (e.g.
`default+qe+kreciprocal`). Bases:

    off-the-shelf     ImageNet Lite0 features, no training
    seed              --recipe seed (the seed notebook's recipe)
    default           the default recipe (P2SGrad on a 512-d neck, strong augmentation, peak lr 6e-4)
    lr3e-4            the default recipe at --lr 3e-4
    lr1e-3            the default recipe at --lr 1e-3
    default-lite2     the default recipe on --backbone efficientnet_lite2 (at its own 260 px)
    arcface           lr3e-4 + --loss arcface (the bases below marked "ArcFace" add their option to it)
    ce                lr3e-4 with cross-entropy on the pooled 1280-d features
                      (--loss ce --embedding-dim 0)
    ce-ls0.1          ce + --label-smoothing 0.1
    sqrt              ArcFace + --sampler sqrt (square-root class-balanced draws)
    balanced          ArcFace + --sampler balanced (every class drawn equally)
    batch32           ArcFace + --batch-size 32 (more, smaller steps in the same epochs)
    lite2             ArcFace on --backbone efficientnet_lite2 (at its own 260 px)
    lite2-lr3e-4      lr3e-4 on --backbone efficientnet_lite2
    lite0-260         lr3e-4 on Lite0 at --image-size 260 (Lite2's input size)

The figures of the training options that measured no better and left the
trainer are in bench/results/trainer-options.md.

Modifiers (serving the base's checkpoint; docs/ranker.md#re-ranking, library defaults):

    tta               the embedder with --tta flip
    qe                each query with alpha-weighted query expansion (n 2, alpha 3)
    kreciprocal       k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3), after qe when both
    wW                the embedding fused with the pooled features at weight W (e.g. w0.5;
                      w0: the plain embedding)

A trained row without wW serves best.pt as the trainer leaves it: fused at the weight its
val/ chose (a run without RUN_DIR/fusion.json gets `python -m trainer fuse RUN_DIR` first). `--demo` measures the rows on `imagesearch demo`'s instance queries
(altered copies of 22 photos, demo seed 0) instead of clothing-small's retrieval split.

`--seeds 42,7` trains and measures each trained base once per seed (rows
`default@7`...) and prints each option's mean over the seeds: one run's
figures vary with the seed by about as much as many options differ.

Checkpoints are trained with `python -m trainer` (Lite0 unless the base says,
ImageNet weights, --epochs, --seed) into runs/quality/<base>-<key>, where the key hashes the data
folder and what the run trains (`trainer.train.training_settings`: the
resolved model and recipe flags, so two spellings of one model share it); a
later run reuses any finished run in --runs that trained the same settings
on the same data, whatever its folder is called, and says so ("cached" in
the table). Without --train an option with no finished
checkpoint is left out of the table (listed at the end). Training minutes
come from the run's summary.csv. Prints a table, then each query whose first
hit some row gets wrong with how many rows do (the queries every row misses
bound top-1 from above), and writes bench/results/quality.json (per row, the
figures and `top1_missed`, those queries' names).
"""

from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import json
import os
import platform
import re
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
from clients.cli import demo as demo_data  # noqa: E402
from clients.cli.services import EMBEDDER_MODULE, RANKER_MODULE, Services, embedder_args  # noqa: E402
from clients.types import KReciprocal, QueryExpansion  # noqa: E402
from imagesearch.model.backbones import FUSION_SOURCE  # noqa: E402
from imagesearch.model.checkpoint import read_checkpoint, update_meta  # noqa: E402
from trainer.train import DEFAULTS as TRAINER_DEFAULTS  # noqa: E402
from trainer.train import training_settings  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("IMAGESEARCH_CLOTHING_DIR", ROOT.parent / "shared" / "data" / "clothing-small"))
RUNS = ROOT / "runs" / "quality"
RESULTS = ROOT / "bench" / "results" / "quality.json"
RESULTS_DEMO = ROOT / "bench" / "results" / "quality-demo.json"
BACKBONE = "efficientnet_lite0"
TRAINER_SEED = TRAINER_DEFAULTS["seed"]  # runs trained with the trainer's own seed keep their plain folder names


LR3 = ["--lr", "3e-4"]
ARCFACE = ["--loss", "arcface", *LR3]  # the bases that add an option to ArcFace
# base -> trainer arguments beyond the common ones, or None for no training
BASES: dict[str, list | None] = {
    "off-the-shelf": None,
    "seed": ["--recipe", "seed"],
    "default": [],
    "lr3e-4": LR3,
    "lr1e-3": ["--lr", "1e-3"],
    "arcface": ARCFACE,
    "ce": ["--loss", "ce", "--embedding-dim", "0", *LR3],
    "ce-ls0.1": ["--loss", "ce", "--embedding-dim", "0", "--label-smoothing", "0.1", *LR3],
    "sqrt": [*ARCFACE, "--sampler", "sqrt"],
    "balanced": [*ARCFACE, "--sampler", "balanced"],
    "batch32": [*ARCFACE, "--batch-size", "32"],
    "lite2": [*ARCFACE, "--backbone", "efficientnet_lite2"],
    "default-lite2": ["--backbone", "efficientnet_lite2"],
    "lite2-lr3e-4": [*LR3, "--backbone", "efficientnet_lite2"],
    "lite0-260": [*LR3, "--image-size", "260"],  # Lite0 at Lite2's input size: resolution or capacity?
}

# modifier -> (embedder extra arguments, index_folder keyword arguments, query_folder keyword arguments)
MODIFIERS: dict[str, tuple[list[str], dict, dict]] = {
    "tta": (["--tta", "flip"], {}, {}),
    "qe": ([], {}, {"query_expansion": QueryExpansion()}),
    "kreciprocal": ([], {}, {"k_reciprocal": KReciprocal()}),
}


def fusion_weight(mod: str) -> float | None:
    """"w0.5" -> 0.5; None for anything else."""
    return float(mod[1:]) if re.fullmatch(r"w(0(\.\d+)?|1(\.0*)?)", mod) else None

DEFAULT_ROWS = ["off-the-shelf", "seed", "ce-ls0.1", "ce", "arcface", "default", "default+tta", "default+qe",
                "default+kreciprocal", "default+qe+kreciprocal", "default+tta+qe+kreciprocal",
                "lr3e-4", "sqrt", "balanced", "batch32", "lite2", "lite2+tta+qe+kreciprocal", "default-lite2",
                "default-lite2+tta+qe+kreciprocal", "lite2-lr3e-4", "lite2-lr3e-4+tta+qe+kreciprocal"]


def parse_option(option: str) -> tuple[str, list[str]]:
    """"base+mod+mod" -> (base, [mod, ...]); SystemExit naming the choices on a bad one."""
    base, *mods = option.split("+")
    bad = [m for m in mods if m not in MODIFIERS and fusion_weight(m) is None]
    weights = [m for m in mods if m not in MODIFIERS]
    if (base not in BASES or bad or len(set(mods)) != len(mods) or len(weights) > 1
            or (weights and BASES.get(base) is None)):
        raise SystemExit(f"unknown option {option!r}: a base ({', '.join(BASES)}) optionally followed by "
                         f"distinct +modifiers ({', '.join(MODIFIERS)}; on a trained base one fusion weight wW, "
                         f"e.g. w0.5)")
    return base, mods


def row_settings(option: str) -> tuple[list[str], dict, dict]:
    """The row's embedder extra arguments, index and query keyword arguments."""
    emb, index_kw, query_kw = [], {}, {}
    for mod in [m for m in parse_option(option)[1] if m in MODIFIERS]:
        e, i, q = MODIFIERS[mod]
        emb, index_kw, query_kw = emb + e, {**index_kw, **i}, {**query_kw, **q}
    return emb, index_kw, query_kw


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="clothing-small folder (train/ val/ retrieval/) (default %(default)s)")
    p.add_argument("--options", default=",".join(DEFAULT_ROWS),
                   help=f"comma-separated rows: a base ({', '.join(BASES)}) optionally followed by +modifiers "
                        f"({', '.join(MODIFIERS)}) (default: {','.join(DEFAULT_ROWS)})")
    p.add_argument("--train", action="store_true", help="train the options that have no finished checkpoint")
    p.add_argument("--train-only", action="store_true", help="train (as --train) and measure nothing")
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default %(default)s)")
    p.add_argument("--seeds", default=str(TRAINER_SEED), type=parse_seeds,
                   help="comma-separated training seeds: each trained base is trained and measured once per "
                        "seed (default %(default)s, the trainer's)")
    p.add_argument("--workers", type=int, default=1, help="trainer DataLoader workers (default %(default)s)")
    p.add_argument("--k", type=int, default=10, help="metrics cut-off and top-k (default %(default)s)")
    p.add_argument("--device", default=None, help="trainer and embedder device: auto | cpu | cuda")
    p.add_argument("--runs", type=Path, default=RUNS, help="where trained runs are kept (default %(default)s)")
    p.add_argument("--demo", action="store_true",
                   help="measure on `imagesearch demo`'s instance queries instead of clothing-small's retrieval split")
    p.add_argument("--out", type=Path, help=f"JSON results (default {RESULTS}, with --demo {RESULTS_DEMO})")
    return p


# ---------------------------------------------------------------- training, cached by data and arguments

def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers separated by commas, e.g. 42,7") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more distinct seeds, e.g. 42,7")
    return seeds


def trainer_args(args, base: str, seed: int) -> list[str]:
    common = ["--backbone", BACKBONE, "--weights", "imagenet", "--epochs", str(args.epochs), "--seed", str(seed)]
    return common + list(BASES[base] or [])  # a base's own --backbone comes later, and wins


def run_dir(args, option: str, seed: int) -> Path:
    """A finished run in --runs that trained `option`'s settings on this data, else
    runs/quality/<option>-<key>, the key hashing the data folder and the settings
    (not --workers or --device, which change the speed, not the model meant)."""
    wanted = training_settings(trainer_args(args, option, seed))
    data = args.data.resolve()
    for saved_args in sorted(args.runs.glob("*/args.json")):
        saved = json.loads(saved_args.read_text())
        if (Path(saved.get("data") or "").resolve() == data and training_settings(saved=saved) == wanted
                and finished(saved_args.parent)):
            return saved_args.parent
    key = hashlib.sha256(json.dumps({"data": str(data), "settings": wanted}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    return args.runs / f"{option}{'' if seed == TRAINER_SEED else f'-seed{seed}'}-{key}"


def finished(run: Path) -> bool:
    """best.pt there and the run at its last epoch or stopped early (last.pt's record)."""
    if not (run / "best.pt").is_file() or not (run / "summary.csv").is_file():
        return False
    saved = json.loads((run / "args.json").read_text())
    with open(run / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return bool(rows) and (int(rows[-1]["epoch"]) >= int(saved["epochs"]) or _stopped_early(rows, saved))


def _stopped_early(rows: list[dict], saved: dict) -> bool:
    best = max((int(r["epoch"]) for r in rows if r["best"] == "1"), default=0)
    return len(rows) - best >= int(saved["patience"])


def train(args, option: str, seed: int) -> Path:
    run = run_dir(args, option, seed)
    command = [sys.executable, "-m", "trainer", "--data", str(args.data), "--workers", str(args.workers),
               *trainer_args(args, option, seed)]
    if args.device:
        command += ["--device", args.device]
    command += ["--resume", str(run)] if (run / "last.pt").is_file() else ["--out", str(run)]
    print(f"training {option}:", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    return run


def served_checkpoint(option: str, label: str, run: Path, folder: Path) -> Path:
    """The checkpoint `option` serves from `run`: best.pt as the trainer leaves it
    (fused as its val/ chose: `trainer fuse` first on a run without fusion.json),
    or a copy in `folder` at the fusion weight its modifier asks for."""
    if not (run / "fusion.json").is_file():
        command = [sys.executable, "-m", "trainer", "fuse", str(run), "--workers", "1"]
        print("choosing the fusion weight:", " ".join(command), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
    weight = next((w for m in parse_option(option)[1] if (w := fusion_weight(m)) is not None), None)
    if weight is None:
        return run / "best.pt"
    return update_meta(run / "best.pt", {"fusion": {"weight": weight, "source": FUSION_SOURCE}},
                       out=folder / f"{label.replace('+', '-').replace('@', '-seed')}.pt")


def training_minutes(run: Path) -> float:
    with open(run / "summary.csv", newline="") as f:
        return sum(float(r["seconds"]) for r in csv.DictReader(f)) / 60


# ---------------------------------------------------------------- measuring through the services

def measure(option: str, label: str, emb_args: list[str], ranker: RankerClient, services: Services,
            retrieval: Path, truth: dict, k: int) -> dict:
    """Start an embedder with `emb_args`, index, query (with `option`'s re-ranking
    options), evaluate, stop it; the row is called `label`."""
    _, index_kw, query_kw = row_settings(option)
    t0 = time.monotonic()
    child = services.start(f"embedder ({label})", EMBEDDER_MODULE, emb_args)
    child.wait_ready(600)
    started_s = time.monotonic() - t0
    try:
        with EmbedderClient(child.address, timeout=120) as emb:
            info = emb.model_info()
            collection = f"clothing-{label}".replace("+", "-").replace("@", "-seed")
            indexed = index_folder(emb, ranker, retrieval / "gallery", collection=collection, progress=False,
                                   **index_kw)
            if indexed.failed:
                raise ClientError(f"{label}: {len(indexed.failed)} gallery images not indexed: {indexed.failed}")
            answered = query_folder(emb, ranker, retrieval / "query", collection=collection, top_k=k, progress=False,
                                    **query_kw)
            if answered.failed:
                raise ClientError(f"{label}: {len(answered.failed)} queries not answered: {answered.failed}")
    finally:
        child.stop()
        services.children.remove(child)
    ev = metrics.evaluate(answered.names(), truth, k=k)
    return {
        "option": label, "backbone": info.backbone, "weights": info.weights, "dim": info.dim,
        "fingerprint": info.fingerprint, "device": info.device, "queries": ev.queries, "gallery": indexed.done,
        f"map@{k}": ev.map, f"precision@{k}": ev.precision, f"recall@{k}": ev.recall, "top1": ev.top1,
        "top1_missed": sorted(q.query for q in ev.per_query if not q.top1),
        "start_s": started_s, "index_s": indexed.seconds, "query_s": answered.seconds,
    }


def seed_means(rows: list[dict], k: int) -> list[dict]:
    """Per option trained with more than one seed: the mean figures and the
    range of P@k over its runs."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("seed") is not None:
            groups.setdefault(r["base_option"], []).append(r)
    out = []
    for option, runs in groups.items():
        if len(runs) < 2:
            continue
        p = [r[f"precision@{k}"] for r in runs]
        out.append({"option": option, "runs": len(runs), "precision": sum(p) / len(p), "precision_min": min(p),
                    "precision_max": max(p), "map": sum(r[f"map@{k}"] for r in runs) / len(runs),
                    "top1": sum(r["top1"] for r in runs) / len(runs)})
    return out


def first_hit_misses(rows: list[dict]) -> list[tuple[str, int]]:
    """Each query some row ranks a wrong first hit for, with how many rows do,
    most first. The queries every option misses cap top-1 whatever the option:
    look at those photos (ambiguous or mislabelled ones are the usual cause)."""
    counts = collections.Counter(q for r in rows for q in r["top1_missed"])
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    args.out = args.out or (RESULTS_DEMO if args.demo else RESULTS)
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    for option in options:  # a bad option is refused first, with or without the data
        parse_option(option)
    retrieval = args.data / "retrieval"
    if not args.demo and not (retrieval / "ground_truth.json").is_file():
        raise SystemExit(f"no clothing-small retrieval split at {retrieval} (pass --data)")

    plan, left_out = [], []
    for option in options:
        source = parse_option(option)[0]
        emb_extra = row_settings(option)[0]
        if BASES[source] is None:
            plan.append((option, option, embedder_args(backbone=BACKBONE, device=args.device, extra=emb_extra),
                         None, "", None))
            continue
        for seed in args.seeds:
            label = option if len(args.seeds) == 1 else f"{option}@{seed}"
            run = run_dir(args, source, seed)
            state = "cached" if finished(run) else ""
            if not state and (args.train or args.train_only):
                train(args, source, seed)
                state = "trained now"
            if not finished(run):
                left_out.append(f"{label} (no finished run at {run}; pass --train)")
                continue
            plan.append((option, label, None, run, state, seed))
    if args.train_only:
        print("trained; measured nothing (--train-only)")
        return 0

    k = args.k
    rows = []
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp, Services() as services:
        if args.demo:  # the demo's own photos and queries, at its default seed
            retrieval = demo_data.build(Path(tmp) / "demo", seed=0)[0].parent
        truth = metrics.load_ground_truth(retrieval / "ground_truth.json")
        ranker_child = services.start("ranker", RANKER_MODULE, ["--db", str(Path(tmp) / "quality.db")])
        ranker_child.wait_ready(120)
        with RankerClient(ranker_child.address, timeout=120) as ranker:
            for option, label, emb_args, run, state, seed in plan:
                fusion = None
                if run is not None:
                    checkpoint = served_checkpoint(option, label, run, Path(tmp))
                    fusion = read_checkpoint(checkpoint)["meta"].get("fusion")
                    emb_args = embedder_args(checkpoint=str(checkpoint), device=args.device,
                                             extra=row_settings(option)[0])
                row = measure(option, label, emb_args, ranker, services, retrieval, truth, k)
                row.update(base_option=option, seed=seed, run=str(run) if run else None, checkpoint=state or "-",
                           fusion=fusion,
                           train_minutes=training_minutes(run) if run else 0.0,
                           trainer_args=trainer_args(args, parse_option(option)[0], seed) if run else None)
                rows.append(row)
                print(f"  {label}: P@{k} {row[f'precision@{k}']:.4f} mAP@{k} {row[f'map@{k}']:.4f} "
                      f"top-1 {row['top1']:.4f}", flush=True)

    print(f"\n{'demo instance queries' if args.demo else 'clothing-small retrieval'}: "
          f"{rows[0]['queries'] if rows else 0} queries, "
          f"{rows[0]['gallery'] if rows else 0} gallery images, k={k}, {args.epochs} epochs, "
          f"through the embedder and ranker services")
    width = max([22, *(len(r["option"]) + 1 for r in rows)])
    print(f"{'option':<{width}} {'backbone':<18} {'dim':>5} {f'P@{k}':>7} {f'mAP@{k}':>7} {'top-1':>7} "
          f"{'train min':>9}  {'fusion':<6} checkpoint")
    for r in rows:
        fusion = f"{r['fusion']['weight']:g}" if r["fusion"] else "-"
        print(f"{r['option']:<{width}} {r['backbone']:<18} {r['dim']:>5} {r[f'precision@{k}']:>7.4f} "
              f"{r[f'map@{k}']:>7.4f} {r['top1']:>7.4f} {r['train_minutes']:>9.1f}  {fusion:<6} {r['checkpoint']}")
    means = seed_means(rows, k)
    if means:
        print(f"\nmean over seeds {','.join(map(str, args.seeds))} (min-max):")
        for m in means:
            print(f"{m['option']:<{width}} P@{k} {m['precision']:.4f} ({m['precision_min']:.4f}-"
                  f"{m['precision_max']:.4f})  mAP@{k} {m['map']:.4f}  top-1 {m['top1']:.4f}  [{m['runs']} runs]")
    missed = first_hit_misses(rows)
    if missed:
        print(f"\nqueries whose first hit is wrong (in how many of the {len(rows)} rows):")
        for query, n in missed:
            print(f"  {query}  {n}/{len(rows)}")
    for note in left_out:
        print(f"left out: {note}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "bench": "quality", "data": "demo" if args.demo else str(args.data), "k": k, "epochs": args.epochs,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "seeds": args.seeds, "rows": rows, "seed_means": means, "left_out": left_out,
    }, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
