"""Training losses behind one interface: `criterion(outputs, targets)` -> the
batch's mean loss, `criterion.logits(outputs)` -> class scores for accuracy.

- `ce`: cross-entropy (with optional label smoothing) on the model's
  classifier head; outputs are logits.
- `arcface`, `subcenter_arcface`, `proxy_anchor`, `p2sgrad`, `adacos`:
  pytorch-metric-learning's ArcFaceLoss (additive angular margin),
  SubCenterArcFaceLoss (the same with 3 centres per class, each image pulled
  to its nearest: a class that looks several ways, or holds mislabelled
  images, need not collapse to one point), ProxyAnchorLoss, P2SGradLoss and
  CosFaceLoss on the embedding; the loss holds the class weights / proxies,
  the model has no head (outputs are the embeddings), and class scores are
  cosines to those weights (the nearest centre's).
- ArcFace's scale (64) and margin come from face recognition's thousands of
  classes; the softmax a scale makes depends on the number of classes
  (Zhang et al., AdaCos, CVPR 2019). The two losses without either:
  `p2sgrad` (the same authors' P2SGrad: cosine-to-one-hot gradients, no
  scale, no margin) and `adacos` (a cosine softmax without margin whose
  scale starts at sqrt(2) ln(C - 1) and follows the batch: dynamic AdaCos,
  pytorch-metric-learning's CosFaceLoss at margin 0 with the scale set
  before each step; under torchrun each process sets it from its own batch,
  as the paper's per-batch estimate does, with no collective that a rank
  with an empty batch would miss).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imagesearch import errors

LOSSES = ("ce", "arcface", "subcenter_arcface", "proxy_anchor", "p2sgrad", "adacos")
SUB_CENTERS = 3  # the paper's and the library's default


class Criterion(nn.Module):
    kind = "ce"
    uses_head = True  # the model's classifier head makes the outputs

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
        elif kind == "p2sgrad":
            self.loss = losses.P2SGradLoss(dim, num_classes)
        elif kind == "adacos":
            self.loss = losses.CosFaceLoss(num_classes, dim, margin=0.0, scale=adacos_initial_scale(num_classes))
            # the scale follows the batches; a buffer, so last.pt carries it to --resume
            self.register_buffer("scale", torch.tensor(float(self.loss.scale)))
        else:
            self.loss = losses.ProxyAnchorLoss(num_classes, dim)  # margin 0.1, alpha 32

    def class_weights(self) -> torch.Tensor:
        """(num_classes x centres per class, dim), a class's centres together"""
        if self.kind == "proxy_anchor":
            return self.loss.proxies
        if self.kind == "p2sgrad":
            return self.loss.weight.t()
        return self.loss.W.t()

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        outputs = outputs.float()
        if self.kind == "adacos":
            if self.training:
                with torch.no_grad():
                    self.scale.fill_(adacos_scale(self.logits(outputs), targets, float(self.scale)))
            self.loss.scale = float(self.scale)  # the stored scale, also after a --resume
        return self.loss(outputs, targets)

    @torch.no_grad()
    def after_step(self) -> None:
        # P2SGrad wants unit class weights and renormalises them in its forward; doing it
        # after each step as well keeps every process's copy equal under torchrun, also on a
        # process whose batch was empty (all files unreadable) and so ran no forward.
        if self.kind == "p2sgrad":
            self.loss.weight.data = self.loss.weight.data.renorm(2, 1, 1e-5).mul(1e5)

    def logits(self, outputs: torch.Tensor) -> torch.Tensor:
        cosines = F.normalize(outputs.float(), dim=1) @ F.normalize(self.class_weights().float(), dim=1).t()
        return cosines.view(len(cosines), self.num_classes, -1).amax(dim=2)  # a class: its nearest centre


def adacos_initial_scale(num_classes: int) -> float:
    """AdaCos's fixed scale for C classes, sqrt(2) ln(C - 1) (Zhang et al. 2019,
    eq. 14): 3.1 for 10 classes, 6.2 for 81, against ArcFace's 64."""
    return math.sqrt(2) * math.log(max(2, num_classes) - 1)


def adacos_scale(cosines: torch.Tensor, targets: torch.Tensor, scale: float) -> float:
    """Dynamic AdaCos (eq. 15-16): ln(B) / cos(min(pi/4, median target
    angle)), B the batch's mean of sum over the other classes of
    exp(scale x cosine). The scale grows as the classes separate."""
    target = F.one_hot(targets, cosines.shape[1]).bool()
    others = torch.where(target, torch.zeros_like(cosines), torch.exp(scale * cosines)).sum(dim=1).mean()
    angle = torch.acos(cosines[target].clamp(-1 + 1e-7, 1 - 1e-7)).median()
    return float(torch.log(others.clamp_min(1e-12)) / torch.cos(angle.clamp(max=math.pi / 4)))


def build_criterion(kind: str, num_classes: int, dim: int, label_smoothing: float = 0.0) -> Criterion:
    if kind == "ce":
        return CrossEntropy(label_smoothing)
    if kind in LOSSES:
        return MetricLoss(kind, num_classes, dim)
    raise errors.InvalidArgument(f"--loss {kind!r}: one of {', '.join(LOSSES)}")
