"""Fine-tune an EfficientNet on an ImageFolder data set.

    imagesearch-train --data DIR --out RUN_DIR [--backbone efficientnet_lite0] ...
    python -m trainer ...                              (the same)
    torchrun --nproc_per_node=N -m trainer ...         (DistributedDataParallel)
    imagesearch-train fuse RUN_DIR [--fusion-weight W] (choose a run's fusion weight again)

Shaped like torchvision's references/classification/train.py:
`get_args_parser()`, `main(args)`, `train_one_epoch(...)`, `evaluate(...)`.
`--recipe default` (P2SGrad on a 512-d neck, AdamW with the new parts at a
higher learning rate, warm-up + cosine, RandomResizedCrop + flip +
TrivialAugmentWide, no label smoothing; see trainer.recipe) or `--recipe
seed` (the seed notebook's exactly: its train transforms, Adam 1e-4,
cross-entropy, batch 50). After every epoch the validation images are
embedded and scored as a retrieval task (each a query against the rest:
mAP@10, P@10, top-1); `--select-by map|loss` picks the epoch kept as
best.pt and the figure early stopping watches. `--loss ce|arcface|p2sgrad` and `--embedding-dim N` (a linear +
BatchNorm neck) are options of the one model, recorded in the checkpoint.
After training, `choose_fusion` picks on val/ the weight at which best.pt is
served fused with its pooled features (`--fusion-weight` fixes it).

RUN_DIR gets args.json, fusion.json and fusion.md, summary.csv (one row per epoch), accuracy.png,
loss.png, retrieval.png, best.pt and last.pt (imagesearch.model.checkpoint format;
last.pt also holds the optimizer, loss, loss-scaler and early-stopping state
for --resume).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from imagesearch import errors, logs
from imagesearch.defaults import DEFAULT_BACKBONE, LOG_FORMAT_ENV
from imagesearch.files import atomic_write_text
from imagesearch.model.backbones import (
    BACKBONES,
    FUSION_SOURCE,
    WEIGHTS_CHOICES_HELP,
    EmbeddingNet,
    backbone_info,
    build_model,
    default_device,
    fuse_vectors,
    set_threads_from_env,
)
from imagesearch.model.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint, update_meta
from imagesearch.model.preprocessing import AUGMENTATIONS, PreprocessSpec, eval_transform, train_transform
from imagesearch.retrieval_metrics import leave_one_out
from trainer import amp, distributed
from trainer import recipe as recipes
from trainer.data import SPLIT_FILE, Batch, Collate, ImageFiles, Layout, check_layout, read_split
from trainer.early_stopping import EarlyStopping
from trainer.losses import LOSSES, Criterion, build_criterion
from trainer.plots import write_plots

log = logging.getLogger(__name__)

PROG = "imagesearch-train"
RETRIEVAL_K = 10
SUMMARY_FIELDS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_map@10",
                  "val_precision@10", "val_top1", "lr", "seconds", "train_skipped", "val_skipped", "train_images",
                  "val_images", "best")
SELECT_BY = {"map": "val_map@10", "loss": "val_loss"}  # --select-by -> summary column


def default_workers(world_size: int = 1) -> int:
    """DataLoader processes per training process: half the cores (decoding a
    256 px JPEG is cheap next to a training step), at least 1, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) // (2 * max(1, world_size))))


# Flags whose value, when not given, comes from the resumed run (else from here,
# then from the recipe: trainer.recipe.RECIPES).
DEFAULTS = {
    "recipe": "default",
    "backbone": DEFAULT_BACKBONE,
    "weights": "imagenet",
    "epochs": 30,
    "batch_size": 50,
    "image_size": None,  # the backbone's own input size (the seed recipe: the notebook's 224)
    "freeze_backbone": False,
    "workers": None,  # default_workers(world size)
    "seed": 42,
    "device": "auto",
    "val_split": None,
}
RECIPE_FLAGS = tuple(recipes.RECIPES["default"])  # filled from --recipe when not given
# Flags a resumed run cannot change: the model and its optimizer depend on them.
FIXED_ON_RESUME = ("recipe", "backbone", "image_size", "freeze_backbone", "loss", "embedding_dim", "optimizer")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, add_help=add_help,
        description="Fine-tune an ImageNet-pretrained EfficientNet on DIR/train/<class>/* and "
                    "DIR/val/<class>/*; writes args.json, summary.csv, accuracy.png, loss.png, "
                    "best.pt and last.pt to RUN_DIR. Run it under `torchrun --nproc_per_node=N -m "
                    "trainer ...` for DistributedDataParallel.")
    p.add_argument("--data", metavar="DIR",
                   help="folder with train/<class>/* and val/<class>/* (val/ may hold a subset of the classes)")
    p.add_argument("--val-split", type=float, metavar="F",
                   help="without DIR/val: carve a stratified, seeded validation split of this fraction out of "
                        "train/ (e.g. 0.1); written to RUN_DIR/val_split.json so a resume sees the same split")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder to create (with --resume: that run's folder)")
    p.add_argument("--backbone", choices=sorted(BACKBONES),
                   help=f"model (default: {DEFAULTS['backbone']}; the Lite ones have ImageNet weights offline)")
    p.add_argument("--weights", metavar="{imagenet,none,FILE}",
                   help=f"starting weights: {WEIGHTS_CHOICES_HELP} (default: imagenet)")
    p.add_argument("--epochs", type=int, help=f"most epochs to train (default: {DEFAULTS['epochs']})")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help=f"images per step, per process (default: {DEFAULTS['batch_size']})")
    r = p.add_argument_group("recipe (flags not given come from --recipe)")
    r.add_argument("--recipe", choices=sorted(recipes.RECIPES),
                   help="default: P2SGrad on a 512-d neck, AdamW, head at --head-lr-mult x lr, warm-up + "
                        "cosine, RandomResizedCrop + TrivialAugmentWide, best epoch by val mAP@10; seed: the seed "
                        "notebook's Adam 1e-4, constant, plain cross-entropy, its augmentation, best by val "
                        "loss (default: default)")
    d, s = recipes.RECIPES["default"], recipes.RECIPES["seed"]
    r.add_argument("--optimizer", choices=("adamw", "adam"), help=f"(default {d['optimizer']}; seed {s['optimizer']})")
    r.add_argument("--lr", type=float, help=f"peak learning rate of the backbone (default {d['lr']}; seed {s['lr']})")
    r.add_argument("--head-lr-mult", type=float, metavar="X",
                   help=f"learning rate of the new parts (head, neck, loss weights) as a multiple of --lr "
                        f"(default {d['head_lr_mult']}; seed {s['head_lr_mult']})")
    r.add_argument("--weight-decay", type=float, help=f"(default {d['weight_decay']}; seed {s['weight_decay']})")
    r.add_argument("--warmup-epochs", type=float, metavar="E",
                   help=f"linear warm-up, in epochs (may be fractional) (default {d['warmup_epochs']}; "
                        f"seed {s['warmup_epochs']})")
    r.add_argument("--schedule", choices=("cosine", "constant"),
                   help=f"after warm-up: cosine decay over --epochs, or constant (default {d['schedule']}; "
                        f"seed {s['schedule']})")
    r.add_argument("--label-smoothing", type=float, metavar="F",
                   help=f"for --loss ce (default {d['label_smoothing']}; seed {s['label_smoothing']})")
    r.add_argument("--augment", choices=AUGMENTATIONS,
                   help="training augmentation: strong (RandomResizedCrop + flip + TrivialAugmentWide) or seed "
                        f"(the notebook's) (default {d['augment']}; "
                        f"seed {s['augment']})")
    r.add_argument("--sampler", choices=("shuffle", *distributed.SAMPLER_POWERS),
                   help="training order: shuffle (each image once an epoch), sqrt (class c drawn in proportion "
                        "to the square root of its image count) or balanced (every class equally); the last two "
                        "draw with replacement, as many images an epoch as shuffle "
                        f"(default {d['sampler']}; seed {s['sampler']})")
    r.add_argument("--select-by", choices=sorted(SELECT_BY),
                   help=f"best.pt is the epoch with the best validation mAP@10 (map) or loss, and early "
                        f"stopping watches that figure (default {d['select_by']}; seed {s['select_by']})")
    r.add_argument("--patience", type=int,
                   help=f"stop after this many epochs without a better --select-by figure "
                        f"(default {d['patience']}; seed {s['patience']})")
    m = p.add_argument_group("model options (recorded in the checkpoint; the embedder serves them)")
    m.add_argument("--loss", choices=LOSSES,
                   help="ce: cross-entropy on a classifier head; arcface, p2sgrad: pytorch-metric-learning's "
                        "losses on the embedding, see trainer/losses.py "
                        f"(default {d['loss']}; seed {s['loss']})")
    m.add_argument("--embedding-dim", type=int, metavar="N",
                   help="a neck (linear + BatchNorm) to an N-d embedding before the loss; 0 = none, the backbone's "
                        f"pooled features (default {d['embedding_dim']}; seed {s['embedding_dim']})")
    m.add_argument("--fusion-weight", type=float, metavar="W",
                   help="serve the embedding fused with the pooled backbone features, cosine = W x theirs + "
                        "(1 - W) x the embedding's; 0 = the plain embedding (default: chosen after training, the "
                        "weight with the best validation mAP@10: RUN_DIR/fusion.md; needs a neck)")
    p.add_argument("--image-size", type=int, metavar="PX",
                   help="square input size (default: the backbone's own, as EfficientNet scales resolution with "
                        "the model: " + ", ".join(f"{name.removeprefix('efficientnet_')} {info.preprocess.input_size}"
                                                  for name, info in sorted(BACKBONES.items()))
                        + f"; --recipe seed: the notebook's {recipes.SEED_IMAGE_SIZE})")
    p.add_argument("--freeze-backbone", action="store_true", default=None,
                   help="train the classifier head only (the seed's fine_tune=False); "
                        "default: all layers trainable")
    p.add_argument("--seed", type=int, help=f"random seed (default: {DEFAULTS['seed']})")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue RUN_DIR from its last.pt: weights, optimizer, epoch and early-stopping "
                        "state; flags not given take that run's values")
    return _local_flags(p)


def _local_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags that say where and how a command runs, not what it makes."""
    p.add_argument("--workers", type=int, metavar="N",
                   help="DataLoader processes per training process (default: half the cores, 1 to 8)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: auto = cuda when there is one)")
    p.add_argument("--log-level", default=os.environ.get("IMAGESEARCH_LOG_LEVEL", "INFO"),
                   help="logging level (default: INFO, env IMAGESEARCH_LOG_LEVEL)")
    p.add_argument("--log-format", default=os.environ.get(LOG_FORMAT_ENV) or "text", choices=logs.FORMATS,
                   help=f"text, or json: one object a line (time, level, logger, message, ...) "
                        f"(env {LOG_FORMAT_ENV}; default %(default)s)")
    return p


def get_fuse_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} fuse", description="(Re)choose a training run's fusion weight without training: score "
        "the weights on the run's validation split, write RUN_DIR/fusion.json and fusion.md, and the chosen "
        "weight into RUN_DIR/best.pt (what the embedder serves).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's folder (args.json, best.pt)")
    p.add_argument("--fusion-weight", type=float, metavar="W",
                   help="this weight (0 = the plain embedding) instead of the one with the best validation mAP@10")
    p.add_argument("--data", metavar="DIR", help="the run's data folder (default: the one its args.json names)")
    return _local_flags(p)


def fuse(args: argparse.Namespace) -> dict:
    """`imagesearch-train fuse RUN_DIR`: `choose_fusion` on a run's validation split, into its best.pt."""
    set_threads_from_env()
    run = Path(args.run_dir)
    if not (run / "best.pt").is_file() or not (run / "args.json").is_file():
        raise errors.InvalidArgument(f"{run}: no best.pt and args.json there; pass the RUN_DIR of a training run")
    given = [x for flag, value in (("--data", args.data), ("--workers", args.workers), ("--device", args.device))
             if value is not None for x in (flag, str(value))]
    saved = json.loads((run / "args.json").read_text())
    targs = _resolve_args(get_args_parser().parse_args(["--resume", str(run), *given]), {"args": saved})
    targs.fusion_weight = args.fusion_weight
    targs.workers = default_workers() if targs.workers is None else targs.workers
    _check_numbers(targs)
    device = default_device(targs.device)
    loaded = load_checkpoint(run / "best.pt", fusion=False)
    carved = read_split(run)
    layout = check_layout(targs.data, val_split=None if carved else targs.val_split, seed=targs.seed, carved=carved)
    if list(layout.class_names) != loaded.class_names:
        raise errors.InvalidArgument(f"--data {targs.data} has classes {list(layout.class_names)}, but {run} was "
                                     f"trained on {loaded.class_names}")
    _, val_loader, _ = _loaders(layout, loaded.spec, targs, distributed.DistInfo(), device)
    model = loaded.model.to(device, memory_format=torch.channels_last)
    fusion = choose_fusion(model, val_loader, device, amp.precision_for(device), run, targs.fusion_weight,
                           progress=targs.log_format == "text")
    update_meta(run / "best.pt", {"fusion": fusion})
    return fusion


# ---------------------------------------------------------------- training loop

def _core(model: nn.Module) -> EmbeddingNet:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _to_device(batch: Batch, device: torch.device):
    """The batch on `device`, images channels-last (bench/results/training.md: a training
    step in 0.63x the time of NCHW on CPU)."""
    images = batch.images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return images, batch.targets.to(device, non_blocking=True)


class SkipLog:
    """Warns once per bad file; counts skipped items per epoch."""

    def __init__(self):
        self.seen: set[str] = set()

    def record(self, batch: Batch) -> int:
        for item in batch.skipped:
            if item.path not in self.seen:
                self.seen.add(item.path)
                log.warning("skipping %s", item.reason)
        return len(batch.skipped)


def train_one_epoch(model: nn.Module, criterion: Criterion, optimizer: torch.optim.Optimizer,
                    loader, device: torch.device, epoch: int, precision: amp.Precision,
                    scaler: torch.amp.GradScaler, *, freeze_backbone: bool = False, skip_log: SkipLog | None = None,
                    progress: bool = True, desc: str = "", schedule: recipes.Schedule | None = None,
                    first_step: int = 0) -> dict:
    """One pass over `loader`. `criterion` gives the batch's mean loss (and
    class scores for accuracy); `schedule` sets the learning rate of step
    `first_step + batch index`.
    Returns loss, accuracy, images and skipped, summed over every process of
    a distributed run."""
    model.train()
    criterion.train()
    if freeze_backbone:
        _core(model).body.eval()  # frozen means frozen: BatchNorm statistics too
    skip_log = skip_log or SkipLog()
    distributed_run = isinstance(model, nn.parallel.DistributedDataParallel)
    loss_sum = correct = seen = skipped = 0.0
    bar = tqdm(loader, desc=desc or f"epoch {epoch} train", unit="batch", disable=not progress,
               dynamic_ncols=True, leave=False, file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    for index, batch in enumerate(bar):
        skipped += skip_log.record(batch)
        if len(batch.targets) == 1:
            # BatchNorm cannot train on one image (one value per channel at small sizes), and
            # its statistics would be noise: leave it out (a final partial batch, or bad files).
            batch = Batch(batch.images[:0], batch.targets[:0], batch.skipped)
        n = len(batch.targets)
        if n == 0 and not distributed_run:
            continue  # nothing to learn from; an Adam step on zero gradients would still move the weights
        if schedule is not None:
            schedule.apply(optimizer, first_step + index)
        images, targets = _to_device(batch, device)
        with precision.autocast():
            outputs = model(images)
        # An empty batch (distributed: every process must step) contributes a zero loss.
        batch_loss = criterion(outputs, targets) if n else outputs.float().sum() * 0.0
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(batch_loss).backward()
        distributed.average_gradients(criterion)  # the loss's own weights are outside DDP
        scaler.step(optimizer)
        scaler.update()
        criterion.after_step()
        if n:
            loss_sum += batch_loss.item() * n
            correct += (criterion.logits(outputs.detach()).argmax(1) == targets).sum().item()
        seen += n
        if seen:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False)
    bar.close()
    return _metrics(loss_sum, correct, seen, skipped, device)


def _embed_split(loader, device: torch.device, step, dim: int, *, skip_log: SkipLog, progress: bool, desc: str):
    """(vectors, labels, skipped files) over `loader`: `step(images, targets)` gives each
    batch's (N, dim) vectors; rows gathered over every process."""
    vectors, labels, skipped = [], [], 0
    bar = tqdm(loader, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True, leave=False,
               file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 30)
    for batch in bar:
        skipped += skip_log.record(batch)
        if len(batch.targets):
            vectors.append(step(*_to_device(batch, device)).float().cpu().numpy())
            labels.append(batch.targets.numpy())
    bar.close()
    vectors = distributed.all_gather_arrays(np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32))
    labels = distributed.all_gather_arrays(np.concatenate(labels) if labels else np.zeros(0, np.int64))
    return vectors, labels, skipped


@torch.inference_mode()
def evaluate(model: nn.Module, criterion: Criterion, loader, device: torch.device,
             precision: amp.Precision, *, skip_log: SkipLog | None = None,
             progress: bool = True, desc: str = "validate", k: int = RETRIEVAL_K) -> dict:
    """Loss and accuracy over `loader` (summed over every process), and the
    split scored as a retrieval task on the embeddings: each image a query
    against all the others, relevant = same class (map, precision, top1 at k)."""
    model = _core(model)  # no DDP collectives: ranks may hold different numbers of batches
    model.eval()
    criterion.eval()
    sums = [0.0, 0.0, 0]  # loss, correct, seen

    def step(images, targets):
        with precision.autocast():
            features = model.features(images)
            outputs = model.head(features)
        sums[0] += criterion(outputs, targets).item() * len(targets)
        sums[1] += (criterion.logits(outputs).argmax(1) == targets).sum().item()
        sums[2] += len(targets)
        return F.normalize(features.float(), dim=1)

    vectors, labels, skipped = _embed_split(loader, device, step, model.dim, skip_log=skip_log or SkipLog(),
                                            progress=progress, desc=desc)
    out = _metrics(*sums, skipped, device)
    scores = leave_one_out(vectors, labels, k)
    out.update(map=scores["map"], precision=scores["precision"], top1=scores["top1"])
    return out


def _metrics(loss_sum, correct, seen, skipped, device) -> dict:
    loss_sum, correct, seen, skipped = distributed.all_reduce_sums([loss_sum, correct, seen, skipped], device)
    return {"loss": loss_sum / seen if seen else math.nan,
            "accuracy": correct / seen if seen else math.nan,
            "images": int(seen), "skipped": int(skipped)}


# ---------------------------------------------------------------- fusion with the pooled features

FUSION_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


@torch.inference_mode()
def choose_fusion(model: nn.Module, loader, device: torch.device, precision: amp.Precision,
                  run_dir: Path | None, weight: float | None = None, *, skip_log: SkipLog | None = None,
                  progress: bool = False) -> dict:
    """The checkpoint's meta "fusion" (imagesearch.model.backbones.fused): the
    embedding fused with the pooled features at each of FUSION_WEIGHTS (and
    `weight`), scored on `loader` (the validation split) with every image a
    query against the others (leave-one-out mAP@10, P@10, top-1). The best
    mAP@10 wins (ties: the smaller weight); `weight` fixes it. A model without
    a neck serves its embedding (weight 0). Writes run_dir/fusion.json and
    fusion.md when run_dir is given (the main process)."""
    model = _core(model).eval()
    d = backbone_info(model.backbone).dim
    table, labels = [], []
    if model.neck_dim:
        def step(images, _):
            with precision.autocast():
                pooled = model.body(images)
                parts = (pooled, model.neck(pooled))
            return torch.cat([F.normalize(p.float(), dim=1) for p in parts], dim=1)

        vectors, labels, _ = _embed_split(loader, device, step, d + model.dim, skip_log=skip_log or SkipLog(),
                                          progress=progress, desc="fusion weights")
        vectors = torch.from_numpy(vectors)
        for w in sorted({*FUSION_WEIGHTS, *([] if weight is None else [weight])}):
            scores = leave_one_out(fuse_vectors(vectors[:, :d], vectors[:, d:], w).numpy(), labels, RETRIEVAL_K)
            table.append({"weight": w, "map@10": scores["map"], "precision@10": scores["precision"],
                          "top1": scores["top1"]})
    pick = max((r for r in table if weight is None or r["weight"] == weight),
               key=lambda r: (-1 if math.isnan(r["map@10"]) else r["map@10"], -r["weight"]), default={"weight": 0.0})
    fusion = {"weight": pick["weight"], "source": FUSION_SOURCE, "val_images": len(labels),
              "chosen_by": ("no neck" if not model.neck_dim else "validation mAP@10" if weight is None
                            else "--fusion-weight")}
    if run_dir is not None:
        atomic_write_text(run_dir / "fusion.json", json.dumps({"chosen": fusion, "table": table}, indent=1) + "\n")
        lines = [f"# Fusion weight {fusion['weight']:g} ({fusion['chosen_by']})", "",
                 (f"Validation split, {len(labels)} images, each a query against the others; cosine = w x the "
                  f"pooled features' + (1 - w) x the embedding's."), "",
                 "| weight | mAP@10 | P@10 | top-1 |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['weight']:g} | {r['map@10']:.4f} | {r['precision@10']:.4f} | {r['top1']:.4f} |"
                  for r in table]
        atomic_write_text(run_dir / "fusion.md", "\n".join(lines) + "\n")
    log.info("fusion weight %g (%s; val mAP@10 %.4f, plain %.4f)", fusion["weight"], fusion["chosen_by"],
             pick.get("map@10", math.nan), table[0]["map@10"] if table else math.nan)
    return fusion


# ---------------------------------------------------------------- run folder

def write_summary(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _args_dict(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())}


# Flags that change where or how fast a run trains, not the model it trains.
RUN_LOCAL = ("data", "out", "resume", "workers", "device", "log_level", "log_format")


def training_settings(argv: list[str] | None = None, saved: dict | None = None) -> dict:
    """What a run trains, comparable across spellings: the resolved model and
    recipe flags of trainer arguments `argv`, or of a run's saved args.json
    (`saved`). Two runs with equal settings on the same data train the same
    model."""
    # A saved run resolves as a --resume of it would: its own flags, then its recipe's.
    given = get_args_parser().parse_args([] if saved is not None else argv or [])
    values = vars(_resolve_args(given, {"args": saved} if saved is not None else None))
    settings = {k: v for k, v in values.items() if k in (*DEFAULTS, *RECIPE_FLAGS)
                and k not in RUN_LOCAL}
    settings["embedding_dim"] = settings.get("embedding_dim") or 0  # None and 0: no neck
    if settings.get("loss") != "ce":
        settings["label_smoothing"] = None  # a metric loss has no use for it
    return settings


# ---------------------------------------------------------------- set-up

@dataclasses.dataclass
class TrainResult:
    model: EmbeddingNet  # holds the best epoch's weights
    run_dir: Path
    history: list[dict]
    best_epoch: int
    stopped_early: bool


def _resolve_args(args: argparse.Namespace, resumed: dict | None) -> argparse.Namespace:
    """Fill flags that were not given: from the resumed run, else DEFAULTS."""
    args = argparse.Namespace(**vars(args))
    saved = (resumed or {}).get("args", {})
    if resumed is not None:
        for key in FIXED_ON_RESUME:
            given = getattr(args, key)
            if key == "embedding_dim" and not given and given is not None and not saved.get(key):
                continue  # 0 given, no neck saved (None before 0 meant none)
            if given is not None and key in saved and given != saved[key]:
                raise errors.InvalidArgument(
                    f"--{key.replace('_', '-')} {given} differs from the resumed run's {saved[key]}; "
                    f"a resumed run keeps its model: drop the flag or start a new run with another --out")
        if args.data is None:
            args.data = saved.get("data")
    for key, default in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, saved.get(key, default) if key not in ("workers", "device") else default)
    for key in RECIPE_FLAGS:
        if getattr(args, key, None) is None:
            setattr(args, key, saved.get(key, recipes.RECIPES[args.recipe][key]))
    if args.image_size is None:
        args.image_size = (recipes.SEED_IMAGE_SIZE if args.recipe == "seed"
                           else backbone_info(args.backbone).preprocess.input_size)
    return args


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                             ("--patience", args.patience, 1), ("--image-size", args.image_size, 8),
                             ("--workers", args.workers, 0), ("--embedding-dim", args.embedding_dim, 0)):
        if value is not None and value < low:
            raise errors.InvalidArgument(f"{flag} {value}: must be at least {low}")
    for flag, value in (("--lr", args.lr), ("--head-lr-mult", args.head_lr_mult)):
        if not (value > 0 and math.isfinite(value)):
            raise errors.InvalidArgument(f"{flag} {value}: must be a positive number")
    if args.fusion_weight is not None and not 0 <= args.fusion_weight <= 1:
        raise errors.InvalidArgument(f"--fusion-weight {args.fusion_weight}: must be between 0 and 1")
    if args.fusion_weight and not args.embedding_dim:
        raise errors.InvalidArgument(f"--fusion-weight {args.fusion_weight} needs a neck (--embedding-dim N): "
                                     f"without one the embedding is the pooled features")
    for flag, value, high in (("--weight-decay", args.weight_decay, math.inf),
                              ("--warmup-epochs", args.warmup_epochs, math.inf),
                              ("--label-smoothing", args.label_smoothing, 1.0)):
        if not (0 <= value < high):
            raise errors.InvalidArgument(f"{flag} {value}: must be at least 0" +
                                         (f" and below {high:g}" if math.isfinite(high) else ""))


def _run_dir(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """(run folder, resume folder or None), refusing to overwrite a run."""
    if args.resume:
        resume = Path(args.resume)
        if not (resume / "last.pt").is_file():
            raise errors.InvalidArgument(
                f"--resume {resume}: no last.pt there; pass the RUN_DIR of an earlier run")
        if args.out and Path(args.out).resolve() != resume.resolve():
            raise errors.InvalidArgument(
                f"--out {args.out} with --resume {resume}: a resumed run continues in its own folder; "
                f"drop --out")
        return resume, resume
    if not args.out:
        raise errors.InvalidArgument("--out RUN_DIR is required (or --resume RUN_DIR)")
    if not args.data:
        raise errors.InvalidArgument("--data DIR is required (a folder with train/<class>/* and val/<class>/*)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise errors.InvalidArgument(f"--out {out} is a file, not a folder")
    taken = [n for n in ("last.pt", "best.pt", "summary.csv") if (out / n).exists()]
    if taken:
        raise errors.InvalidArgument(
            f"--out {out} already holds a run ({', '.join(taken)}); continue it with --resume {out}, "
            f"or choose another --out")
    return out, None


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _loaders(layout: Layout, spec: PreprocessSpec, args, dist_info: distributed.DistInfo,
             device: torch.device):
    collate = Collate(spec.input_size)
    train_set = ImageFiles(layout.train.samples, train_transform(spec, args.augment), reduce_to=spec.decode_size)
    val_set = ImageFiles(layout.val.samples, eval_transform(spec), reduce_to=spec.decode_size)
    if args.sampler == "shuffle":
        train_sampler = DistributedSampler(train_set, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                           shuffle=True, seed=args.seed, drop_last=False)
    else:
        train_sampler = distributed.ClassBalancedSampler(
            [t for _, t in layout.train.samples], distributed.SAMPLER_POWERS[args.sampler],
            rank=dist_info.rank, world_size=dist_info.world_size, seed=args.seed)
    val_sampler = distributed.ShardSampler(len(val_set), dist_info.rank, dist_info.world_size)
    common = {"batch_size": args.batch_size, "num_workers": args.workers, "collate_fn": collate,
              "pin_memory": device.type == "cuda"}
    if args.workers > 0:
        common["prefetch_factor"] = 2
    train_loader = DataLoader(train_set, sampler=train_sampler, **common)
    val_loader = DataLoader(val_set, sampler=val_sampler, **common)
    return train_loader, val_loader, train_sampler


def _meta(args, layout: Layout, spec: PreprocessSpec, model: EmbeddingNet, epoch: int, row: dict | None,
          best_epoch: int) -> dict:
    return {
        "backbone": args.backbone,
        "class_names": list(layout.class_names),
        "preprocess": spec.to_dict(),
        "embedding_dim": model.dim,
        "model": model.options(),  # neck, head: how to rebuild it (imagesearch.model.checkpoint)
        "loss": args.loss,
        "recipe": args.recipe,
        "epoch": epoch,
        "metrics": dict(row or {}),
        "best_epoch": best_epoch,
        "weights": args.weights,  # what training started from
        "freeze_backbone": bool(args.freeze_backbone),
        "args": _args_dict(args),
        "torch": str(torch.__version__),
    }


def main(args: argparse.Namespace) -> TrainResult:
    """Train as `args` says. Raises `errors.ImageSearchError` for anything the
    user must fix, always before the first training step."""
    set_threads_from_env()
    dist_info = distributed.from_env()
    run_dir, resume_dir = _run_dir(args)
    resumed = read_checkpoint(resume_dir / "last.pt") if resume_dir else None
    args = _resolve_args(args, resumed["meta"] if resumed else None)
    if args.workers is None:
        args.workers = default_workers(dist_info.world_size)
    _check_numbers(args)

    device = default_device(args.device)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
    precision = amp.precision_for(device)  # bf16 (else fp16 + loss scaling) on CUDA, off on CPU

    carved = read_split(run_dir) if resume_dir else None
    layout = check_layout(args.data, val_split=None if carved else args.val_split, seed=args.seed, carved=carved)
    if resumed and list(layout.class_names) != list(resumed["meta"]["class_names"]):
        raise errors.InvalidArgument(
            f"--data {args.data} has classes {list(layout.class_names)}, but the resumed run was trained on "
            f"{resumed['meta']['class_names']}")
    info = backbone_info(args.backbone)
    spec = PreprocessSpec(args.image_size, info.preprocess.mean, info.preprocess.std,
                          info.preprocess.interpolation, info.preprocess.decode)
    num_classes = len(layout.class_names)

    _seed_all(args.seed)
    head_classes = num_classes if args.loss == "ce" else 0  # a metric-learning loss holds the class weights
    if resumed:
        model = EmbeddingNet(args.backbone, **resumed["meta"]["model"])
        model.load_state_dict(resumed["state_dict"], strict=True)
    else:
        model = build_model(args.backbone, args.weights, head_classes,
                            neck_dim=args.embedding_dim or None)  # WeightsUnavailable: before training
    if args.freeze_backbone:
        model.body.requires_grad_(False)
    criterion = build_criterion(args.loss, num_classes, model.dim, args.label_smoothing)
    distributed.init(dist_info, device)
    model.to(device)
    criterion.to(device)
    model.to(memory_format=torch.channels_last)
    train_model: nn.Module = model
    if dist_info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    groups = recipes.parameter_groups(model, criterion, args.lr, args.head_lr_mult, args.weight_decay)
    params = [p for g in groups for p in g["params"]]
    optimizer = recipes.build_optimizer(args.optimizer, groups)
    scaler = precision.grad_scaler()
    selector = EarlyStopping(args.patience, mode="max" if args.select_by == "map" else "min")
    history: list[dict] = []
    start_epoch = 0
    best_state = None
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        for group, fresh in zip(optimizer.param_groups, groups):  # --lr etc. may change on resume
            group.update(base_lr=fresh["base_lr"], lr=fresh["lr"], weight_decay=fresh["weight_decay"])
        if resumed.get("criterion"):
            criterion.load_state_dict(resumed["criterion"])
        if resumed.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(resumed["scaler"])
        selector.load_state_dict(resumed["early_stopping"])
        history = list(resumed.get("history", []))
        start_epoch = int(resumed["meta"]["epoch"])
        if (run_dir / "best.pt").is_file():
            best = read_checkpoint(run_dir / "best.pt")
            if int(best["meta"]["epoch"]) == selector.best_epoch:
                best_state = best["state_dict"]
        if best_state is None and selector.best_epoch:
            raise errors.InvalidArgument(
                f"--resume {run_dir}: best.pt is missing or not from the best epoch "
                f"{selector.best_epoch} that last.pt records; cannot restore the best weights")

    train_loader, val_loader, train_sampler = _loaders(layout, spec, args, dist_info, device)
    steps_per_epoch = len(train_loader)
    del resumed
    schedule = recipes.Schedule(args.schedule, args.epochs * steps_per_epoch,
                                round(args.warmup_epochs * steps_per_epoch))
    main_proc = dist_info.is_main
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = {"world_size": dist_info.world_size, "device": str(device), "amp": precision.mode,
                    "class_names": list(layout.class_names), "preprocess": spec.to_dict(),
                    "train_images": len(layout.train.samples), "val_images": len(layout.val.samples),
                    "embedding_dim": model.dim, "steps_per_epoch": steps_per_epoch,
                    "resumed_at_epoch": start_epoch or None, "torch": str(torch.__version__)}
        if layout.carved is not None:
            atomic_write_text(run_dir / SPLIT_FILE, json.dumps(layout.carved, indent=1) + "\n")
        atomic_write_text(run_dir / "args.json",
                           json.dumps({**_args_dict(args), "resolved": resolved}, indent=2) + "\n")
    trainable = sum(p.numel() for p in params)
    log.info("data %s: %d classes, %d train / %d val images; %s (weights %s, %s, %d-d embedding, "
             "loss %s), %s trainable parameters; recipe %s: %s lr %g (new parts x%g), %s, %s augmentation, best by val %s; "
             "device %s x%d, amp %s, batch %d, workers %d", args.data, num_classes,
             len(layout.train.samples), len(layout.val.samples), args.backbone,
             args.weights if not start_epoch else f"resumed at epoch {start_epoch}",
             "frozen backbone" if args.freeze_backbone else "all layers", model.dim, args.loss,
             f"{trainable:,}", args.recipe, args.optimizer, args.lr, args.head_lr_mult, args.schedule,
             args.augment, args.select_by, device, dist_info.world_size, precision.mode, args.batch_size, args.workers)

    watched = SELECT_BY[args.select_by]
    if start_epoch >= args.epochs:
        log.info("nothing to do: %s is at epoch %d of --epochs %d (pass a larger --epochs to go on)",
                 run_dir, start_epoch, args.epochs)
    elif selector.should_stop:
        log.info("nothing to do: %s stopped early (%d epochs without a better %s, patience %d; "
                 "pass a larger --patience to go on)", run_dir, selector.bad_epochs, watched, args.patience)

    skip_log = SkipLog()
    stopped_early = selector.should_stop
    epoch = start_epoch
    # Progress bars are for a terminal: a JSON log stream gets only JSON lines.
    bars = main_proc and getattr(args, "log_format", "text") == "text"
    while epoch < args.epochs and not selector.should_stop:
        epoch += 1
        _seed_all(args.seed + 10_000 * epoch + dist_info.rank)  # same augmentations after --resume
        train_sampler.set_epoch(epoch)
        started = time.monotonic()
        tr = train_one_epoch(train_model, criterion, optimizer, train_loader, device, epoch, precision, scaler,
                             freeze_backbone=bool(args.freeze_backbone), skip_log=skip_log, progress=bars,
                             desc=f"epoch {epoch}/{args.epochs} train",
                             schedule=schedule, first_step=(epoch - 1) * steps_per_epoch)
        va = evaluate(model, criterion, val_loader, device, precision, skip_log=skip_log, progress=bars,
                      desc=f"epoch {epoch}/{args.epochs} val")
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
               "val_loss": va["loss"], "val_accuracy": va["accuracy"], "val_map@10": va["map"],
               "val_precision@10": va["precision"], "val_top1": va["top1"], "lr": optimizer.param_groups[0]["lr"],
               "seconds": round(time.monotonic() - started, 1), "train_skipped": tr["skipped"],
               "val_skipped": va["skipped"], "train_images": tr["images"], "val_images": va["images"]}
        improved = selector.step(epoch, row[watched])
        row["best"] = int(improved)
        if improved:
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        history.append(row)
        if main_proc:
            meta = _meta(args, layout, spec, model, epoch, row, selector.best_epoch)
            if improved:
                save_checkpoint(run_dir / "best.pt", model, meta)
            extra = {"scaler": scaler.state_dict(), "early_stopping": selector.state_dict(),
                     "criterion": criterion.state_dict(), "history": history}
            save_checkpoint(run_dir / "last.pt", model, meta, optimizer.state_dict(), extra=extra)
            write_summary(run_dir / "summary.csv", history)
            write_plots(run_dir, history, selector.best_epoch, title=args.backbone)
        skipped = tr["skipped"] + va["skipped"]
        log.info("epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f mAP@10 %.4f P@10 %.4f%s | "
                 "lr %g | %.0fs%s", epoch, args.epochs, tr["loss"], tr["accuracy"], va["loss"], va["accuracy"],
                 va["map"], va["precision"],
                 " (best)" if improved else f" (best: epoch {selector.best_epoch}, {selector.bad_epochs}/"
                                            f"{args.patience} without improvement)",
                 row["lr"], row["seconds"], f" | skipped {skipped} bad files" if skipped else "")
        if selector.should_stop:
            stopped_early = True
            log.info("early stop after epoch %d: validation %s has not beaten epoch %d's %.4f for %d epochs",
                     epoch, watched, selector.best_epoch, selector.best_value, selector.bad_epochs)
        distributed.barrier()

    if best_state is not None:
        model.load_state_dict(best_state)
        best = next((r for r in history if r["epoch"] == selector.best_epoch), None)
        if best is not None:
            log.info("restored the best epoch's weights: epoch %d (val loss %.4f, acc %.4f, mAP@10 %.4f) -> %s",
                     best["epoch"], best["val_loss"], best["val_accuracy"], best["val_map@10"],
                     run_dir / "best.pt")
        fusion = choose_fusion(model, val_loader, device, precision, run_dir if main_proc else None,
                               args.fusion_weight, skip_log=skip_log, progress=bars)
        if main_proc and (run_dir / "best.pt").is_file():
            update_meta(run_dir / "best.pt", {"fusion": fusion})
    else:
        log.warning("no epoch had a finite validation %s; best.pt was not written", SELECT_BY[args.select_by])
    return TrainResult(model, run_dir, history, selector.best_epoch, stopped_early)
