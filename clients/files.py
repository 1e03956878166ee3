"""Walking an image folder: every file under it, named by its path relative
to the folder with posix separators (the names that go into the ranker and
into the results JSON)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from clients.errors import UsageError
from imagesearch.defaults import (
    IMAGE_EXTENSIONS,  # noqa: F401 (re-exported)
    is_image_path,
)


@dataclasses.dataclass(frozen=True)
class FolderListing:
    root: Path
    images: list[tuple[str, Path]]   # (relative posix name, path), sorted by name
    skipped: list[tuple[str, str]]   # (relative posix name, why)


def list_images(folder: str | os.PathLike, *, what: str = "folder") -> FolderListing:
    """Every file under `folder` (recursively, following no symlinked
    folders): images by extension, and the rest with the reason they are
    skipped. Hidden files and folders (starting with '.') are skipped too."""
    root = Path(folder)
    if not root.exists():
        raise UsageError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise UsageError(f"{what} {root} is not a folder")
    images: list[tuple[str, Path]] = []
    skipped: list[tuple[str, str]] = []

    def onerror(exc: OSError) -> None:
        name = Path(exc.filename).relative_to(root).as_posix() if exc.filename else str(root)
        skipped.append((name, f"cannot list: {exc.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        base = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            path = base / filename
            name = path.relative_to(root).as_posix()
            if filename.startswith("."):
                skipped.append((name, "hidden file"))
            elif not is_image_path(filename):
                skipped.append((name, "not an image (extension)"))
            elif not path.is_file():
                skipped.append((name, "not a regular file"))
            else:
                images.append((name, path))
    images.sort()
    skipped.sort()
    return FolderListing(root, images, skipped)
