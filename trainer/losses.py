"""Training losses behind one interface: `criterion(outputs, targets)` -> the
batch's mean loss, `criterion.logits(outputs)` -> class scores for accuracy.

- `ce`: cross-entropy (with optional label smoothing) on the model's
  classifier head; outputs are logits.
- `arcface`, `p2sgrad`: pytorch-metric-learning's ArcFaceLoss (additive
  angular margin, scale 64) and P2SGradLoss (Zhang et al., CVPR 2019: each
  cosine to a class weight regressed to one-hot, no scale and no margin to
  set per data set) on the embedding. The loss holds the class weights, the
  model has no head (outputs are the embeddings), and class scores are the
  cosines to those weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagesearch import errors

LOSSES = ("ce", "arcface", "p2sgrad")


class Criterion(nn.Module):
    kind = "ce"

    def logits(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs

    def after_step(self) -> None:
        """Called on every process after each optimiser step, batch or not."""


class CrossEntropy(Criterion):
    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(outputs.float(), targets)


class MetricLoss(Criterion):
    def __init__(self, kind: str, num_classes: int, dim: int):
        super().__init__()
        from pytorch_metric_learning import losses  # only when asked for

        self.kind = kind
        self.num_classes = num_classes
        if kind == "arcface":
            self.loss = losses.ArcFaceLoss(num_classes, dim)  # margin 28.6 degrees, scale 64
        else:
            self.loss = losses.P2SGradLoss(dim, num_classes)

    def class_weights(self) -> torch.Tensor:
        """(num_classes, dim)"""
        return self.loss.weight.t() if self.kind == "p2sgrad" else self.loss.W.t()

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(outputs.float(), targets)

    @torch.no_grad()
    def after_step(self) -> None:
        # P2SGrad wants unit class weights and renormalises them in its forward; doing it
        # after each step as well keeps every process's copy equal under torchrun, also on a
        # process whose batch was empty (all files unreadable) and so ran no forward.
        if self.kind == "p2sgrad":
            self.loss.weight.data = self.loss.weight.data.renorm(2, 1, 1e-5).mul(1e5)

    def logits(self, outputs: torch.Tensor) -> torch.Tensor:
        return F.normalize(outputs.float(), dim=1) @ F.normalize(self.class_weights().float(), dim=1).t()


def build_criterion(kind: str, num_classes: int, dim: int, label_smoothing: float = 0.0) -> Criterion:
    if kind == "ce":
        return CrossEntropy(label_smoothing)
    if kind in LOSSES:
        return MetricLoss(kind, num_classes, dim)
    raise errors.InvalidArgument(f"--loss {kind!r}: one of {', '.join(LOSSES)}")
