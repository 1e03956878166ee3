"""Training data: the ImageFolder layout check and a dataset that skips bad files.

Layout: ``DIR/train/<class>/...`` and ``DIR/val/<class>/...`` (files may sit
in sub-folders of a class, as with torchvision's ImageFolder). The classes and
their indices always come from train/; val/ may hold a subset of them (public
datasets' official splits often do), never a class train/ lacks. Without
val/, ``--val-split F`` carves a stratified, seeded validation split out of
train/; the split is written to the run folder (`val_split.json`) so a resumed
run and a later evaluation see the same one. `check_layout` finds every
problem that would only show up later (a missing split, a val class train/
lacks, an empty class) and raises one `errors.InvalidArgument` that says what
to fix.

`ImageFiles` decodes with `imagesearch.model.preprocessing.decode_image`, the same
decoder the embedder uses. A file that cannot be read or decoded does not
stop training: the item comes back as a `Skipped` record, `Collate` drops it
from the batch and passes it on, and the training loop warns once per file
and counts it in the summary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from imagesearch import errors
from imagesearch.model.preprocessing import IMAGE_EXTENSIONS, decode_image, is_image_path

log = logging.getLogger(__name__)

SPLIT_FILE = "val_split.json"  # in the run folder: the validation split carved by --val-split


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
    # Set when the validation split was carved out of train/ (--val-split): what to
    # write to the run folder so that a resume sees the same split.
    carved: dict | None = None


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


def check_layout(data_dir: str | os.PathLike, *, val_split: float | None = None, seed: int = 42,
                 carved: dict | None = None) -> Layout:
    """Scan DIR/train and DIR/val; raise `errors.InvalidArgument` naming every
    problem at once (missing split, a val class train/ lacks, empty classes).

    Without DIR/val, `val_split` (a fraction) carves a stratified validation
    split out of train/ with `seed`; `carved` (a `Layout.carved` written by an
    earlier run) restores exactly that split instead."""
    root = Path(data_dir)
    expected = f"expected {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg (ImageFolder layout)"
    if not root.is_dir():
        raise errors.InvalidArgument(f"--data {root}: no such directory; {expected}")
    if not (root / "train").is_dir():
        raise errors.InvalidArgument(f"--data {root}: missing train/ folder; {expected}")
    has_val = (root / "val").is_dir()
    if val_split is not None and not 0 < val_split < 1:
        raise errors.InvalidArgument(f"--val-split {val_split}: must be a fraction between 0 and 1, e.g. 0.1")
    if has_val and (val_split is not None or carved is not None):
        raise errors.InvalidArgument(
            f"--data {root} has a val/ folder, so --val-split (which carves val from train/ when there is no "
            f"val/) does not apply: drop --val-split, or use a data folder without val/")
    if not has_val and val_split is None and carved is None:
        raise errors.InvalidArgument(
            f"--data {root}: missing val/ folder; {expected}, or pass --val-split 0.1 to carve a validation "
            f"split out of train/")

    problems = []
    class_names = tuple(_class_dirs(root / "train"))
    if not class_names:
        problems.append(f"{root / 'train'} has no class folders")
    empty = []
    train_files = {}
    for c in class_names:
        train_files[c] = _image_files(root / "train" / c)
        if not train_files[c]:
            empty.append(f"train/{c}/")
    val_files: dict[str, list[str]] = {}
    if has_val:
        val_classes = _class_dirs(root / "val")
        unknown = sorted(set(val_classes) - set(class_names))
        if unknown:
            problems.append(f"class(es) {', '.join(unknown)} in val/ but not in train/ (the classes come from "
                            f"train/: add {', '.join(f'train/{c}/' for c in unknown)} with images, or remove "
                            f"them from val/)")
        for c in val_classes:
            if c in class_names:
                val_files[c] = _image_files(root / "val" / c)
                if not val_files[c]:
                    empty.append(f"val/{c}/")
        if not val_classes:
            problems.append(f"{root / 'val'} has no class folders")
    if empty:
        problems.append(f"empty class folder(s), no image files ({'/'.join(IMAGE_EXTENSIONS)}) in "
                        f"{', '.join(empty)} (add images or remove the class folder)")
    if not problems and len(class_names) < 2:
        problems.append(f"only one class ({class_names[0]}); a classifier needs at least 2 class folders")
    if problems:
        raise errors.InvalidArgument(f"--data {root}: " + "; ".join(problems))

    if not has_val:
        if carved is None:
            carved = carve_split(root / "train", train_files, val_split, seed)
        train_files, val_files = _apply_carved(root, train_files, carved)
    missing = [c for c in class_names if c not in val_files]
    if missing:
        log.info("val/ has no images of %d of the %d classes (%s): they are trained on, not validated",
                 len(missing), len(class_names), ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))

    def split(name: str, files: dict[str, list[str]]) -> Split:
        samples = tuple((path, i) for i, c in enumerate(class_names) for path in files.get(c, ()))
        return Split(root / name, class_names, samples)

    return Layout(root, class_names, split("train", train_files), split("val", val_files),
                  carved if not has_val else None)


def carve_split(train_dir: Path, files: dict[str, list[str]], fraction: float, seed: int) -> dict:
    """A stratified validation split: in each class with at least 2 images,
    round(fraction x n) of them (at least 1, never all), chosen with `seed`."""
    val: list[str] = []
    for c in sorted(files):
        paths = sorted(files[c])
        if len(paths) < 2:
            continue
        k = min(len(paths) - 1, max(1, round(fraction * len(paths))))
        val.extend(random.Random(f"{seed}:{c}").sample(paths, k))
    return {"val_split": fraction, "seed": seed,
            "val": sorted(Path(p).relative_to(train_dir).as_posix() for p in val)}


def _apply_carved(root: Path, files: dict[str, list[str]], carved: dict):
    chosen = set(carved.get("val") or ())
    train: dict[str, list[str]] = {}
    val: dict[str, list[str]] = {}
    for c, paths in files.items():
        for p in paths:
            rel = Path(p).relative_to(root / "train").as_posix()
            (val if rel in chosen else train).setdefault(c, []).append(p)
    found = sum(len(v) for v in val.values())
    if found != len(chosen):
        raise errors.InvalidArgument(
            f"--data {root}: {len(chosen) - found} of the {len(chosen)} validation images recorded in "
            f"{SPLIT_FILE} are no longer in train/; the split cannot be restored (start a new run)")
    return train, val


def read_split(run_dir: Path) -> dict | None:
    """The carved split an earlier run wrote, or None."""
    path = Path(run_dir) / SPLIT_FILE
    if not path.is_file():
        return None
    try:
        carved = json.loads(path.read_text())
        if not isinstance(carved.get("val"), list):
            raise ValueError("no 'val' list")
    except (ValueError, AttributeError) as exc:
        raise errors.InvalidArgument(f"{path} is damaged ({exc}); start a new run") from None
    return carved


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A sample that could not be used, and why."""

    path: str
    reason: str


class ImageFiles(Dataset):
    """(tensor, class index) per file, or a `Skipped` record for a file that
    cannot be read or decoded (never an exception that ends the run)."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable, reduce_to: int | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.reduce_to = reduce_to  # PreprocessSpec.decode_size: JPEGs decoded as the embedder decodes them

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
            image = decode_image(data, name=path, reduce_to=self.reduce_to)
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
