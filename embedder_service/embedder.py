"""The embedder core: a loaded model on a device, image bytes in, unit vectors out.

Knows nothing of gRPC. `decode` turns one encoded image into the model's input
tensor with the project's one preprocessing path (`imagesearch.model.preprocessing`);
`embed_tensors` runs a batch through the one model definition
(`imagesearch.model.backbones.EmbeddingNet.embed`) under `torch.inference_mode()`, in
channels_last, with fp16/bf16 autocast on CUDA, and returns float32 unit
vectors. The batching lives in `embedder_service.batcher`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from imagesearch import errors
from imagesearch.model.backbones import DEFAULT_BACKBONE, default_device, fingerprint
from imagesearch.model.checkpoint import LoadedModel, load_model
from imagesearch.model.preprocessing import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    PreprocessSpec,
    load_tensor,
)

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
TTAS = ("none", "flip")  # test-time augmentation: flip = mean of the image's and its mirror's vectors
_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_dtype(device_type: str, precision: str = "auto", *, bf16_supported: bool = True) -> torch.dtype | None:
    """The autocast dtype for `precision` on a device type; None means plain float32.

    auto: fp16 on CUDA (tensor cores, and 10 mantissa bits keep vectors closer
    to float32 than bf16's 7), float32 elsewhere. fp16 is CUDA-only; bf16 needs
    a GPU that has it (Ampere and later) or the CPU."""
    if precision not in PRECISIONS:
        raise errors.InvalidArgument(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.float16 if device_type == "cuda" else None
    dtype = _DTYPES[precision]
    if dtype is torch.float16 and device_type != "cuda":
        raise errors.InvalidArgument(f"--precision fp16 needs a CUDA device, not {device_type}; use fp32 or bf16")
    if dtype is torch.bfloat16 and not bf16_supported:
        raise errors.InvalidArgument(f"--precision bf16: this {device_type} device has no bfloat16; use fp16 or fp32")
    return dtype


def bucket_size(n: int, max_batch: int) -> int:
    """The batch size `n` items are padded to on CUDA: the next power of two,
    capped at `max_batch`, so cuDNN autotunes a handful of shapes at start-up
    (see `cuda_buckets`) instead of a new one for every batch size that arrives."""
    if n >= max_batch:
        return n
    return min(1 << (n - 1).bit_length(), max_batch)


def cuda_buckets(max_batch: int) -> list[int]:
    """Every size `bucket_size` can return for 1..max_batch."""
    return sorted({bucket_size(n, max_batch) for n in range(1, max_batch + 1)})


def _precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What is served: enough to tell whether two servers' vectors agree."""

    backbone: str
    dim: int
    spec: PreprocessSpec
    device: str
    precision: str
    fingerprint: str
    weights: str
    class_names: tuple[str, ...]
    tta: str = "none"


class Embedder:
    """A model ready for inference plus the limits its inputs must respect."""

    def __init__(self, loaded: LoadedModel, *, device: str | torch.device = "auto", precision: str = "auto",
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_batch: int | None = None, tta: str = "none"):
        if max_image_bytes < 1 or max_image_pixels < 1:
            raise errors.InvalidArgument("image limits must be positive")
        if tta not in TTAS:
            raise errors.InvalidArgument(f"unknown test-time augmentation {tta!r}; one of {', '.join(TTAS)}")
        self.tta = tta
        self.device = default_device(device) if isinstance(device, str) else device
        bf16 = (torch.cuda.is_bf16_supported() if self.device.type == "cuda" else True)
        self.autocast = autocast_dtype(self.device.type, precision, bf16_supported=bf16)
        self.spec = loaded.spec
        self.max_image_bytes = int(max_image_bytes)
        self.max_image_pixels = int(max_image_pixels)
        model = loaded.model.eval()
        # The fingerprint is over the weights as loaded (float32, CPU), so it is
        # the same whichever device serves them.
        self.info = ModelInfo(
            backbone=loaded.backbone, dim=model.dim, spec=loaded.spec, device=str(self.device),
            precision=_precision_name(self.autocast),
            fingerprint=fingerprint(model, loaded.spec, loaded.backbone, tta=tta),
            weights=loaded.weights, class_names=tuple(loaded.class_names), tta=tta)
        # On CUDA, pad batches to a few fixed sizes and let cuDNN pick the fastest
        # kernels for each (eval-mode BatchNorm: padding changes no other row).
        self.bucket_cap = max_batch if self.device.type == "cuda" else None
        if self.bucket_cap:
            torch.backends.cudnn.benchmark = True
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self._pin = self.device.type == "cuda"

    @classmethod
    def load(cls, *, checkpoint: str | None = None, backbone: str | None = None, weights: str | None = None,
             **kwargs) -> "Embedder":
        """A trainer checkpoint (backbone and preprocessing from its meta), else
        `backbone` (default efficientnet_lite0) with `weights` (default imagenet)."""
        if checkpoint and weights:
            raise errors.InvalidArgument(
                "--checkpoint and --weights exclude each other: a checkpoint holds its own weights")
        started = time.monotonic()
        loaded = load_model(checkpoint, backbone or DEFAULT_BACKBONE, weights or "imagenet")
        if checkpoint and backbone and backbone != loaded.backbone:
            raise errors.InvalidArgument(
                f"--backbone {backbone} does not match the checkpoint {checkpoint}, "
                f"which holds {loaded.backbone}; drop --backbone")
        embedder = cls(loaded, **kwargs)
        log.info("loaded %s (%s weights, %d-d, tta %s) on %s, %s, in %.1fs; fingerprint %s", embedder.info.backbone,
                 embedder.info.weights, embedder.info.dim, embedder.info.tta, embedder.info.device,
                 embedder.info.precision,
                 time.monotonic() - started, embedder.info.fingerprint[:16])
        return embedder

    # ------------------------------------------------------------ the two stages

    def decode(self, data: bytes, name: str = "") -> torch.Tensor:
        """Encoded image -> (3, S, S) float32 input tensor, within this embedder's
        limits. Raises InvalidImage / ResourceExhausted naming `name`."""
        return load_tensor(data, self.spec, name=name, max_bytes=self.max_image_bytes,
                           max_pixels=self.max_image_pixels)

    def embed_tensors(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        """A batch of decoded inputs -> (N, dim) float32 unit vectors."""
        tensors = list(tensors)
        n = len(tensors)
        if self.bucket_cap:
            tensors += [torch.zeros_like(tensors[0])] * (bucket_size(n, self.bucket_cap) - n)
        x = torch.stack(tensors)
        if self._pin:
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast,
                                                    enabled=self.autocast is not None):
            vectors = self.model.embed(x)  # float32 and L2-normalised (EmbeddingNet.embed)
            if self.tta == "flip":
                vectors = F.normalize(vectors + self.model.embed(x.flip(3)), dim=1)
        return vectors[:n].float().cpu().numpy()

    def embed_images(self, images: Sequence[bytes], names: Sequence[str] | None = None) -> np.ndarray:
        """Decode serially, then one forward: the in-process baseline the benchmark compares with."""
        names = names or [""] * len(images)
        return self.embed_tensors([self.decode(data, name) for data, name in zip(images, names)])

    def warm_up(self, batch_sizes: Sequence[int] | None = None) -> None:
        """Run dummy batches so the first real request pays no lazy set-up
        (kernel selection, cuDNN autotuning, allocator growth). Default: every
        CUDA bucket, or one image on CPU."""
        started = time.monotonic()
        size = self.spec.input_size
        if batch_sizes is None:
            batch_sizes = cuda_buckets(self.bucket_cap) if self.bucket_cap else (1,)
        for n in batch_sizes:
            self.embed_tensors([torch.zeros(3, size, size)] * n)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("warmed up batch sizes %s in %.1fs", list(batch_sizes), time.monotonic() - started)


def default_prepare_workers() -> int:
    """Decode threads: enough to keep a GPU fed, few enough not to starve a small CPU."""
    return max(1, min(8, os.cpu_count() or 1))
