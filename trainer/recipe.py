"""The training recipes: loss, optimiser, learning-rate schedule and augmentation.

`--recipe default`: P2SGrad (pytorch-metric-learning) on a 512-d embedding
neck, AdamW, the new parts at `head_lr_mult` x the backbone's learning rate,
linear warm-up then cosine decay per step, RandomResizedCrop + flip +
TrivialAugmentWide, no label smoothing, checkpoint chosen by validation
mAP@10 (figures: bench/results/quality.md). `--recipe seed` is the seed
notebook's exactly (Adam 1e-4 on every layer, constant, plain cross-entropy
on the pooled features, its augmentation, chosen by validation loss). A
recipe only fills the flags that were not given.
"""

from __future__ import annotations

import math

import torch
from torch import nn

RECIPES = {
    "default": {"loss": "p2sgrad", "embedding_dim": 512, "optimizer": "adamw", "lr": 6e-4, "head_lr_mult": 10.0,
                "weight_decay": 0.05, "warmup_epochs": 0.5, "schedule": "cosine", "label_smoothing": 0.0,
                "select_by": "map", "patience": 5, "augment": "strong", "sampler": "shuffle"},
    "seed": {"loss": "ce", "embedding_dim": 0, "optimizer": "adam", "lr": 1e-4, "head_lr_mult": 1.0,
             "weight_decay": 0.0, "warmup_epochs": 0.0, "schedule": "constant", "label_smoothing": 0.0,
             "select_by": "loss", "patience": 3, "augment": "seed", "sampler": "shuffle"},
}
SEED_IMAGE_SIZE = 224  # the notebook's input size, whatever the backbone (the default recipe: the backbone's own)
MIN_LR_FACTOR = 0.01  # the cosine ends at 1 % of the peak, not 0


def parameter_groups(model: nn.Module, extra: nn.Module | None, lr: float, head_lr_mult: float,
                     weight_decay: float) -> list[dict]:
    """Backbone body at `lr`; everything new (neck, head, the loss's class
    weights) at lr x head_lr_mult. Weight decay on matrices and convolution
    kernels only (not on biases or norms). Groups with the same settings are
    merged, so the seed recipe has one group."""
    buckets: dict[tuple[float, float], list] = {}

    def add(name: str, p: torch.Tensor, new: bool) -> None:
        if not p.requires_grad:
            return
        key = (head_lr_mult if new else 1.0, weight_decay if p.ndim >= 2 else 0.0)
        buckets.setdefault(key, []).append(p)

    for name, p in model.named_parameters():
        add(name, p, not name.startswith("body."))
    if extra is not None:
        for name, p in extra.named_parameters():
            add(name, p, True)
    return [{"params": params, "lr": lr * mult, "base_lr": lr * mult, "weight_decay": wd}
            for (mult, wd), params in sorted(buckets.items())]


def build_optimizer(kind: str, groups: list[dict]) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(groups)
    return torch.optim.Adam(groups)


class Schedule:
    """Per-step learning-rate factor: linear warm-up to 1 over `warmup`
    steps, then constant or a cosine down to MIN_LR_FACTOR at `total`."""

    def __init__(self, kind: str, total: int, warmup: int):
        self.kind, self.total, self.warmup = kind, max(1, total), max(0, min(warmup, total))

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return MIN_LR_FACTOR + (1 - MIN_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        f = self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * f
