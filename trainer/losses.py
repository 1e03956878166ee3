"""Training losses behind one interface: `criterion(outputs, targets)` -> the
batch's mean loss, `criterion.logits(outputs)` -> class scores for accuracy.

- `ce`: cross-entropy (with optional label smoothing) on the model's
  classifier head; outputs are logits.
- `arcface`, `subcenter_arcface`, `proxy_anchor`: pytorch-metric-learning's
  ArcFaceLoss (additive angular margin), SubCenterArcFaceLoss (the same with
  3 centres per class, each image pulled to its nearest: a class that looks
  several ways, or holds mislabelled images, need not collapse to one
  point) and ProxyAnchorLoss on the embedding; the loss holds the class
  weights / proxies, the model has no head (outputs are the embeddings), and
  class scores are cosines to those weights (the nearest centre's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagesearch import errors

LOSSES = ("ce", "arcface", "subcenter_arcface", "proxy_anchor")
SUB_CENTERS = 3  # the paper's and the library's default


class Criterion(nn.Module):
    kind = "ce"
    uses_head = True  # the model's classifier head makes the outputs

    def logits(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs


class CrossEntropy(Criterion):
    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(outputs.float(), targets)


class MetricLoss(Criterion):
    uses_head = False

    def __init__(self, kind: str, num_classes: int, dim: int):
        super().__init__()
        from pytorch_metric_learning import losses  # only when asked for

        self.kind = kind
        self.num_classes = num_classes
        if kind == "arcface":
            self.loss = losses.ArcFaceLoss(num_classes, dim)  # margin 28.6 degrees, scale 64
        elif kind == "subcenter_arcface":
            self.loss = losses.SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=dim,
                                                     sub_centers=SUB_CENTERS)  # same margin, scale
        else:
            self.loss = losses.ProxyAnchorLoss(num_classes, dim)  # margin 0.1, alpha 32

    def class_weights(self) -> torch.Tensor:
        """(num_classes x centres per class, dim), a class's centres together"""
        return self.loss.W.t() if self.kind != "proxy_anchor" else self.loss.proxies

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(outputs.float(), targets)

    def logits(self, outputs: torch.Tensor) -> torch.Tensor:
        cosines = F.normalize(outputs.float(), dim=1) @ F.normalize(self.class_weights().float(), dim=1).t()
        return cosines.view(len(cosines), self.num_classes, -1).amax(dim=2)  # a class: its nearest centre


def build_criterion(kind: str, num_classes: int, dim: int, label_smoothing: float = 0.0) -> Criterion:
    if kind == "ce":
        return CrossEntropy(label_smoothing)
    if kind in LOSSES:
        return MetricLoss(kind, num_classes, dim)
    raise errors.InvalidArgument(f"--loss {kind!r}: one of {', '.join(LOSSES)}")
