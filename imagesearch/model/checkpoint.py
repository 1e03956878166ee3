"""Checkpoint files: one `.pt` holding a state_dict and its meta.

Layout (loads with `torch.load(path, weights_only=True)`):

    {"format": "imagesearch.checkpoint/1",
     "state_dict": EmbeddingNet.state_dict(),
     "meta": {"backbone", "class_names", "preprocess": {input_size, mean, std,
              interpolation}, "embedding_dim", "epoch", "metrics",
              "model": {"neck_dim", "num_classes"} (EmbeddingNet.options()),
              "fusion": {"weight", "source"} (optional; what is served: backbones.fused), ...},
     "optimizer": optional optimizer state (for --resume)}

Writes are atomic (temporary file + os.replace), so a crash never leaves
half a checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from imagesearch import errors
from imagesearch.defaults import DEFAULT_BACKBONE
from imagesearch.files import atomic_write
from imagesearch.model.backbones import EmbeddingNet, FusedNet, backbone_info, build_model, fused, load_tensors
from imagesearch.model.preprocessing import PreprocessSpec

FORMAT = "imagesearch.checkpoint/1"


@dataclasses.dataclass
class LoadedModel:
    """A model ready for inference and what describes it."""

    model: EmbeddingNet | FusedNet
    spec: PreprocessSpec
    backbone: str
    weights: str  # "imagenet", "none", a weights path or a checkpoint path
    class_names: list[str]
    meta: dict


def save_checkpoint(path: str | os.PathLike, model: EmbeddingNet, meta: dict,
                    optimizer_state: dict | None = None, extra: dict | None = None) -> Path:
    payload = {"format": FORMAT, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "meta": meta}
    if optimizer_state is not None:
        payload["optimizer"] = optimizer_state
    if extra:
        payload.update(extra)
    return atomic_write(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise errors.InvalidArgument(f"checkpoint {path} does not exist")
    payload = load_tensors(path, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise errors.InvalidArgument(
            f"{path} is not an imagesearch checkpoint (no format {FORMAT!r}); "
            f"for plain weights use --weights {path}")
    return payload


def update_meta(path: str | os.PathLike, changes: dict, out: str | os.PathLike | None = None) -> Path:
    """Write checkpoint `path` with `changes` in its meta to `out` (default: `path` itself)."""
    payload = read_checkpoint(path)
    payload["meta"].update(changes)
    return atomic_write(out or path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, *, fusion: bool = True) -> LoadedModel:
    """The model a checkpoint serves: fused as its meta says, or (fusion=False) the plain one."""
    payload = read_checkpoint(path)
    meta = payload["meta"]
    class_names = list(meta.get("class_names") or [])
    model = EmbeddingNet(meta["backbone"], **meta["model"])
    model.load_state_dict(payload["state_dict"], strict=True)
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    return LoadedModel(fused(model, meta.get("fusion") if fusion else None), spec, meta["backbone"], str(path),
                       class_names, meta)


def load_model(checkpoint: str | os.PathLike | None = None, backbone: str = DEFAULT_BACKBONE,
               weights: str = "imagenet") -> LoadedModel:
    """The model an embedder serves: a trainer checkpoint (backbone and
    preprocessing from its meta), else `backbone` with `weights`."""
    if checkpoint:
        return load_checkpoint(checkpoint)
    info = backbone_info(backbone)
    model = build_model(backbone, weights)
    return LoadedModel(model, info.preprocess, backbone, weights, [], {})
