"""Training data: the ImageFolder layout check and a dataset that skips bad files.

Layout: ``DIR/train/<class>/...`` and ``DIR/val/<class>/...`` with the same
class folders on both sides (files may sit in sub-folders of a class, as with
torchvision's ImageFolder). `check_layout` finds every problem that would
only show up later (a missing split, a class on one side only, an empty
class) and raises one `errors.InvalidArgument` that says what to fix.

`ImageFiles` decodes with `imagesearch.model.preprocessing.decode_image`, the same
decoder the embedder uses. A file that cannot be read or decoded does not
stop training: the item comes back as a `Skipped` record, `Collate` drops it
from the batch and passes it on, and the training loop warns once per file
and counts it in the summary.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from imagesearch import errors
from imagesearch.model.preprocessing import IMAGE_EXTENSIONS, decode_image, is_image_path

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class Split:
    """One split: sorted (path, class index) samples over `class_names`."""

    root: Path
    class_names: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(self.class_names, 0)
        for _, target in self.samples:
            out[self.class_names[target]] += 1
        return out


@dataclasses.dataclass(frozen=True)
class Layout:
    root: Path
    class_names: tuple[str, ...]
    train: Split
    val: Split


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir)
                  if e.is_dir() and not e.name.startswith("."))


def _image_files(class_dir: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if not f.startswith(".") and is_image_path(f))
    return found


def check_layout(data_dir: str | os.PathLike) -> Layout:
    """Scan DIR/train and DIR/val; raise `errors.InvalidArgument` naming every
    problem at once (missing split, classes on one side only, empty classes)."""
    root = Path(data_dir)
    expected = f"expected {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg (ImageFolder layout)"
    if not root.is_dir():
        raise errors.InvalidArgument(f"--data {root}: no such directory; {expected}")
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise errors.InvalidArgument(
            f"--data {root}: missing {' and '.join(f'{s}/' for s in missing)} folder; {expected}")

    classes = {s: _class_dirs(root / s) for s in SPLITS}
    problems = []
    for s in SPLITS:
        if not classes[s]:
            problems.append(f"{root / s} has no class folders")
    only_train = sorted(set(classes["train"]) - set(classes["val"]))
    only_val = sorted(set(classes["val"]) - set(classes["train"]))
    if only_train:
        problems.append(f"class(es) {', '.join(only_train)} in train/ but not in val/ "
                        f"(add {', '.join(f'val/{c}/' for c in only_train)} with images, or remove them from train/)")
    if only_val:
        problems.append(f"class(es) {', '.join(only_val)} in val/ but not in train/ "
                        f"(add {', '.join(f'train/{c}/' for c in only_val)} with images, or remove them from val/)")

    class_names = tuple(sorted(set(classes["train"]) & set(classes["val"])))
    files: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    empty = []
    for s in SPLITS:
        for c in class_names:
            files[s][c] = _image_files(root / s / c)
            if not files[s][c]:
                empty.append(f"{s}/{c}/")
    if empty:
        problems.append(f"empty class folder(s), no image files ({'/'.join(IMAGE_EXTENSIONS)}) in "
                        f"{', '.join(empty)} (add images or remove the class from both train/ and val/)")
    if not problems and len(class_names) < 2:
        problems.append(f"only one class ({class_names[0]}); a classifier needs at least 2 class folders")
    if problems:
        raise errors.InvalidArgument(f"--data {root}: " + "; ".join(problems))

    splits = {}
    for s in SPLITS:
        samples = tuple((path, i) for i, c in enumerate(class_names) for path in files[s][c])
        splits[s] = Split(root / s, class_names, samples)
    return Layout(root, class_names, splits["train"], splits["val"])


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A sample that could not be used, and why."""

    path: str
    reason: str


class ImageFiles(Dataset):
    """(tensor, class index) per file, or a `Skipped` record for a file that
    cannot be read or decoded (never an exception that ends the run)."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable,
                 max_bytes: int | None = None, max_pixels: int | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
            kwargs = {}
            if self.max_bytes is not None:
                kwargs["max_bytes"] = self.max_bytes
            if self.max_pixels is not None:
                kwargs["max_pixels"] = self.max_pixels
            image = decode_image(data, name=path, **kwargs)
            return self.transform(image), target
        except (errors.InvalidImage, errors.ResourceExhausted) as exc:
            return Skipped(path, str(exc))
        except OSError as exc:  # unreadable: permissions, vanished, I/O error
            return Skipped(path, f"{path}: cannot read: {exc.strerror or exc}")


@dataclasses.dataclass
class Batch:
    images: torch.Tensor  # (N, 3, S, S); N may be 0 when every file was bad
    targets: torch.Tensor  # (N,) int64
    skipped: list[Skipped]

    def pin_memory(self) -> "Batch":
        return Batch(self.images.pin_memory(), self.targets.pin_memory(), self.skipped)


class Collate:
    """Stack the good items; carry the `Skipped` ones along for counting.
    A batch of only bad files becomes an empty (0, 3, S, S) batch, so every
    process of a distributed run still takes its step."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, items: list) -> Batch:
        good = [it for it in items if not isinstance(it, Skipped)]
        skipped = [it for it in items if isinstance(it, Skipped)]
        if good:
            images = torch.stack([im for im, _ in good])
            targets = torch.tensor([t for _, t in good], dtype=torch.long)
        else:
            images = torch.zeros((0, 3, self.image_size, self.image_size))
            targets = torch.zeros(0, dtype=torch.long)
        return Batch(images, targets, skipped)
