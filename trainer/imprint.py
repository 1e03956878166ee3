"""`--head-init imprint`: start a metric loss's class weights at the classes'
mean embeddings instead of at random (weight imprinting: Qi, Brown and Lowe,
"Low-Shot Learning with Imprinted Weights", CVPR 2018).

Why: with random class weights (and a random neck) the first steps' gradients
through the pretrained backbone chase a head that does not yet mean anything,
which distorts the features the product serves (the argument of LP-FT: Kumar
et al., "Fine-Tuning can Distort Pretrained Features", ICLR 2022). Imprinting
gets a head that already classifies, in closed form, for one forward pass
over a few images a class: the backbone then starts from a loss that points
somewhere.

How: up to `PER_CLASS` training images a class (a seeded draw), the eval
transform (the pixels the embedder serves), the backbone in eval mode. The
neck's BatchNorm gets these images' statistics as its running statistics,
so the embedding in eval mode matches what training mode sees at the start.
Each class weight (every sub-centre, proxy) is then the direction of its
class's mean L2-normalised embedding, at the length the loss gave it (Adam's
steps are relative to it). Sub-centres get a small share of their random
start on top, or they would stay one centre.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from imagesearch import errors
from imagesearch.model.backbones import EmbeddingNet
from imagesearch.model.preprocessing import PreprocessSpec, eval_transform
from trainer.data import Collate, ImageFiles
from trainer.losses import Criterion

log = logging.getLogger(__name__)

HEAD_INITS = ("random", "imprint")
PER_CLASS = 32  # enough images for a class mean; bounds the cost at one forward pass of 32 x classes images
SUB_CENTRE_SPREAD = 0.1  # share of a sub-centre's random start kept beside the class mean


def pick(samples: Sequence[tuple[str, int]], per_class: int, seed: int) -> list[tuple[str, int]]:
    """Up to `per_class` samples of each class, drawn with `seed`, in file order."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, (_, target) in enumerate(samples):
        by_class[target].append(i)
    rng = random.Random(seed)
    chosen = [i for idx in by_class.values() for i in (idx if len(idx) <= per_class else rng.sample(idx, per_class))]
    return [samples[i] for i in sorted(chosen)]


@torch.no_grad()
def imprint(model: EmbeddingNet, criterion: Criterion, samples: Sequence[tuple[str, int]], spec: PreprocessSpec,
            num_classes: int, device: torch.device, *, seed: int, batch_size: int = 50, workers: int = 0,
            per_class: int = PER_CLASS) -> dict:
    """Set `criterion`'s class weights (and the neck's BatchNorm statistics) from
    the training images. Returns what it did, for the log and args.json."""
    if not hasattr(criterion, "class_weights"):
        raise errors.InvalidArgument(
            f"--head-init imprint sets a metric loss's class weights; --loss {criterion.kind} has a linear "
            f"classifier head instead: use --head-init random, or a metric loss such as --loss p2sgrad")
    started = time.monotonic()
    chosen = pick(samples, per_class, seed)
    loader = DataLoader(ImageFiles(chosen, eval_transform(spec), reduce_to=spec.decode_size),
                        batch_size=batch_size, num_workers=workers, collate_fn=Collate(spec.input_size))
    was_training = model.training
    model.eval()
    pooled, targets = [], []
    for batch in loader:
        if len(batch.targets):
            pooled.append(model.body(batch.images.to(device)).float())
            targets.append(batch.targets.to(device))
    model.train(was_training)
    if not pooled:
        raise errors.InvalidArgument("--head-init imprint: none of the chosen training images could be read")
    pooled, targets = torch.cat(pooled), torch.cat(targets)
    missing = sorted(set(range(num_classes)) - set(targets.tolist()))
    if missing:
        raise errors.InvalidArgument(
            f"--head-init imprint: no readable training image for class index {missing[0]}; "
            f"check that class's files, or use --head-init random")
    embedding = _through_neck(model.neck, pooled)
    unit = F.normalize(embedding, dim=1)
    means = F.normalize(torch.zeros(num_classes, unit.shape[1], device=device).index_add_(0, targets, unit), dim=1)
    accuracy = float(((unit @ means.t()).argmax(1) == targets).float().mean())
    weights = criterion.class_weights()  # (classes x centres, dim), a class's centres together (a view)
    centres = weights.shape[0] // num_classes
    lengths = weights.norm(dim=1, keepdim=True)
    target = means.repeat_interleave(centres, dim=0)
    if centres > 1:
        target = F.normalize(target + SUB_CENTRE_SPREAD * F.normalize(weights.float(), dim=1), dim=1)
    weights.copy_((target * lengths).to(weights.dtype))
    done = {"images": len(targets), "per_class": per_class, "accuracy": round(accuracy, 4),
            "seconds": round(time.monotonic() - started, 1)}
    log.info("imprinted the class weights from %d training images (up to %d a class) in %.1fs: "
             "they classify %.1f%% of those images", done["images"], per_class, done["seconds"], 100 * accuracy)
    return done


def _through_neck(neck: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """The embedding the neck gives `pooled`, after setting its BatchNorm's
    running statistics to these features' (no neck: the pooled features)."""
    if isinstance(neck, nn.Identity):
        return pooled
    linear, norm = neck[0], neck[1]
    z = linear(pooled.to(linear.weight.dtype)).float()
    norm.running_mean.copy_(z.mean(dim=0))
    norm.running_var.copy_(z.var(dim=0, unbiased=True) if len(z) > 1 else torch.ones_like(norm.running_var))
    norm.num_batches_tracked.zero_()
    return F.batch_norm(z, norm.running_mean, norm.running_var, norm.weight.float(), norm.bias.float(),
                        training=False, eps=norm.eps)
