"""Distillation from a trained teacher checkpoint (`--distill-from FILE`).

The product serves the cheap backbone (Lite0 on a CPU) while a larger one
(Lite2, B4) ranks better (bench/README.md "Search quality": the gain is the
larger backbone's capacity, not its input size). Distillation trains the
cheap student to rank as the teacher does: besides its own loss, the
student's pairwise cosines within each batch regress to the teacher's on
the same augmented images (relational knowledge distillation, Park et al.,
CVPR 2019; similarity-preserving KD, Tung & Mori, ICCV 2019). Cosines,
not the vectors: the two embedding spaces need share no axes, or even a
dimension. The term is a mean squared error of cosines, as P2SGrad's (the
default loss) is, so `--distill-weight 1` weighs them alike.

The teacher is any checkpoint the embedder serves (imagesearch.model.checkpoint),
frozen, in eval mode. It sees the student's augmented batch in its own
preprocessing: un-normalised with the student's mean/std, normalised with
its own, resized to its own input size.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from imagesearch import errors
from imagesearch.model.checkpoint import load_checkpoint
from imagesearch.model.preprocessing import PreprocessSpec


def check_teacher_path(path: str | Path, *, resumed: bool = False) -> None:
    if Path(path).is_file():
        return
    if resumed:
        raise errors.InvalidArgument(f"the resumed run was distilled from {path}, which is no longer there: put the "
                                     f"teacher back at that path (a resumed run keeps its teacher)")
    raise errors.InvalidArgument(f"--distill-from {path}: no such file; pass a checkpoint the trainer wrote "
                                 f"(a run's best.pt)")


class Teacher(nn.Module):
    """A frozen checkpoint's embeddings of a batch made for `student_spec`."""

    def __init__(self, path: str | Path, student_spec: PreprocessSpec):
        super().__init__()
        loaded = load_checkpoint(path)  # InvalidArgument for a missing file or one that is not a checkpoint
        self.backbone = loaded.backbone
        self.model = loaded.model.eval().requires_grad_(False)
        self.dim = self.model.dim
        self.size = loaded.spec.input_size
        # x_teacher = (x_student * std_s + mean_s - mean_t) / std_t = x_student * scale + shift
        mean_s, std_s = torch.tensor(student_spec.mean), torch.tensor(student_spec.std)
        mean_t, std_t = torch.tensor(loaded.spec.mean), torch.tensor(loaded.spec.std)
        self.register_buffer("scale", (std_s / std_t).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean_s - mean_t) / std_t).view(1, 3, 1, 1), persistent=False)
        self.same_input = bool(torch.equal(mean_s, mean_t) and torch.equal(std_s, std_t))

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: its BatchNorm statistics are the trained ones

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 teacher embeddings of the student's input batch."""
        x = images if self.same_input else images * self.scale + self.shift
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return self.model.embed(x)


def relational_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the batch's pairwise cosines, student's
    against teacher's, over the pairs of distinct images (0 for a batch of
    one). Gradients reach the student only."""
    n = len(student)
    if n < 2:
        return student.float().sum() * 0.0
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.detach().float(), dim=1)
    off = ~torch.eye(n, dtype=torch.bool, device=s.device)
    return ((s @ s.t() - t @ t.t())[off] ** 2).mean()
