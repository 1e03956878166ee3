"""The embedder core: a loaded model on an engine, image bytes in, unit vectors out.

Knows nothing of gRPC. `decode` turns one encoded image into the model's input
tensor with the project's one preprocessing path (`imagesearch.model.preprocessing`);
`embed_tensors` runs a batch through the inference engine
(`imagesearch.model.engines`: torch or onnxruntime, both equal to the one
model definition's `EmbeddingNet.embed` in float32) and returns float32 unit
vectors. The batching lives in `embedder_service.batcher`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from imagesearch import errors
from imagesearch.model import engines
from imagesearch.model.backbones import DEFAULT_BACKBONE, default_device, fingerprint
from imagesearch.model.checkpoint import LoadedModel, load_model
from imagesearch.model.preprocessing import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    PreprocessSpec,
    is_image_path,
    load_tensor,
)

log = logging.getLogger(__name__)

TTAS = ("none", "flip")  # test-time augmentation: flip = mean of the image's and its mirror's vectors
# Calibration images read from --int8-calibration (and its subfolders), evenly spread by path.
INT8_CALIBRATION_IMAGES = 128


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What is served: enough to tell whether two servers' vectors agree."""

    backbone: str
    dim: int
    spec: PreprocessSpec
    device: str
    precision: str  # fp32, fp16 (torch on CUDA) or int8
    engine: str  # torch or onnxruntime
    fingerprint: str
    weights: str
    class_names: tuple[str, ...]
    tta: str = "none"


class Embedder:
    """A model ready for inference plus the limits its inputs must respect."""

    def __init__(self, loaded: LoadedModel, *, device: str | torch.device = "auto",
                 engine: str = "auto", cache_dir: str | os.PathLike | None = None,
                 int8_calibration: str | os.PathLike | None = None,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_batch: int | None = None, tta: str = "none", engine_threads: int | None = None):
        if max_image_bytes < 1 or max_image_pixels < 1:
            raise errors.InvalidArgument("image limits must be positive")
        if tta not in TTAS:
            raise errors.InvalidArgument(f"unknown test-time augmentation {tta!r}; one of {', '.join(TTAS)}")
        self.tta = tta
        self.device, name = resolve_engine(engine, device)
        self.spec = loaded.spec
        self.max_image_bytes = int(max_image_bytes)
        self.max_image_pixels = int(max_image_pixels)
        model = loaded.model.eval()
        # The fingerprint is over the weights as loaded (float32, CPU), so it is
        # the same whichever device and float32 engine serve them.
        # The ONNX export is of the plain model: its cache key leaves TTA out.
        float_fingerprint = fingerprint(model, loaded.spec, loaded.backbone)
        model_fingerprint = fingerprint(model, loaded.spec, loaded.backbone, tta=tta)
        int8_path = None
        if int8_calibration is not None:
            int8_path, model_fingerprint = self._int8(
                model, float_fingerprint, model_fingerprint, Path(int8_calibration), name, cache_dir)
        self.engine = engines.build_engine(name, model, loaded.spec, float_fingerprint,
                                           device=self.device, max_batch=max_batch,
                                           cache_dir=cache_dir, int8_path=int8_path,
                                           threads=engine_threads)
        self.info = ModelInfo(
            backbone=loaded.backbone, dim=model.dim, spec=loaded.spec, device=str(self.device),
            precision=self.engine.precision, engine=self.engine.name, fingerprint=model_fingerprint,
            weights=loaded.weights, class_names=tuple(loaded.class_names), tta=tta)

    def _int8(self, model, float_fingerprint: str, model_fingerprint: str, folder: Path, engine: str,
              cache_dir) -> tuple[Path, str]:
        """The cached int8 ONNX file calibrated on `folder`'s images, and the served fingerprint."""
        if engine != "onnxruntime":
            raise errors.InvalidArgument(f"--int8-calibration is served by --engine onnxruntime, not {engine}")
        if not folder.is_dir():
            raise errors.InvalidArgument(f"--int8-calibration {folder}: no such folder")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_path(p))
        files = files[::max(1, len(files) // INT8_CALIBRATION_IMAGES)][:INT8_CALIBRATION_IMAGES]  # spread over subfolders
        if not files:
            raise errors.InvalidArgument(f"--int8-calibration {folder}: no images in it")
        calibration = engines.calibration_id(files)
        cache = Path(cache_dir or engines.default_cache_dir())
        path = cache / "int8" / f"{engines.int8_fingerprint(float_fingerprint, calibration)}.onnx"
        if not path.is_file():
            float_path = engines.onnx_file(model, self.spec, float_fingerprint, cache)
            tensors = [self.decode(p.read_bytes(), str(p)) for p in files]
            batches = (torch.stack(tensors[i:i + 8]).numpy() for i in range(0, len(tensors), 8))
            engines.quantize_int8(float_path, path, batches)
        return path, engines.int8_fingerprint(model_fingerprint, calibration)

    @classmethod
    def load(cls, *, checkpoint: str | None = None, backbone: str | None = None, weights: str | None = None,
             decode: str | None = None, **kwargs) -> "Embedder":
        """A trainer checkpoint (backbone and preprocessing from its meta), else
        `backbone` (default efficientnet_lite0) with `weights` (default imagenet).
        `decode` "draft" or "full" overrides the spec's JPEG decode mode (and so
        the fingerprint)."""
        if checkpoint and weights:
            raise errors.InvalidArgument(
                "--checkpoint and --weights exclude each other: a checkpoint holds its own weights")
        started = time.monotonic()
        loaded = load_model(checkpoint, backbone or DEFAULT_BACKBONE, weights or "imagenet")
        if checkpoint and backbone and backbone != loaded.backbone:
            raise errors.InvalidArgument(
                f"--backbone {backbone} does not match the checkpoint {checkpoint}, "
                f"which holds {loaded.backbone}; drop --backbone")
        if decode is not None:
            loaded = dataclasses.replace(loaded, spec=dataclasses.replace(loaded.spec, decode=decode))
        embedder = cls(loaded, **kwargs)
        log.info("loaded %s (%s weights, %d-d, tta %s) on %s, engine %s, %s, in %.1fs; fingerprint %s",
                 embedder.info.backbone, embedder.info.weights, embedder.info.dim, embedder.info.tta,
                 embedder.info.device, embedder.info.engine, embedder.info.precision,
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
        vectors = self.engine(torch.stack(list(tensors)))
        if self.tta == "flip":
            mirrored = self.engine(torch.stack(list(tensors)).flip(3))
            vectors = F.normalize(torch.from_numpy(vectors + mirrored), dim=1).numpy()
        return vectors

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
            sizes = getattr(self.engine, "warm_up_sizes", None)
            batch_sizes = sizes() if sizes else (1,)
        for n in batch_sizes:
            self.embed_tensors([torch.zeros(3, size, size)] * n)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("warmed up batch sizes %s in %.1fs", list(batch_sizes), time.monotonic() - started)


def resolve_engine(engine: str = "auto", device: str | torch.device = "auto") -> tuple[torch.device, str]:
    """The device and the engine name (`auto` resolved: engines.resolve_engine) an Embedder would use."""
    device = default_device(engines.engine_device(engine, device)) if isinstance(device, str) else device
    return device, engines.resolve_engine(engine, device.type)
