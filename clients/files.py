"""Walking an image folder: every file under it, named by its path relative
to the folder with posix separators (the names that go into the ranker and
into the results JSON); the attributes `imagesearch index` keeps for each
file; thumbnails of gallery files (the HTML report, the web page)."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from pathlib import Path

from clients.errors import UsageError
from imagesearch.defaults import (
    IMAGE_EXTENSIONS,  # noqa: F401 (re-exported)
    is_image_path,
)


log = logging.getLogger(__name__)

# The attributes `imagesearch index` keeps for each file (clients.cli.incremental).
SHA256, SIZE, MTIME = "sha256", "size", "mtime"
FILE_KEYS = (SHA256, SIZE, MTIME)


def file_inside(root: str | os.PathLike, name: str) -> Path | None:
    """The regular file `root / name` names, when it lies inside `root` once
    `..` and symlinks are resolved; None for anything else (an absolute name,
    `..` or a symlink leading out, a missing file, a folder, a device)."""
    if not name or "\0" in name:
        return None
    try:
        base = Path(root).resolve()
        target = (base / name).resolve()
        if target != base and target.is_relative_to(base) and target.is_file():
            return target
    except (OSError, RuntimeError, ValueError):  # unreadable, a symlink loop, a bad name
        pass
    return None


@dataclasses.dataclass(frozen=True)
class FolderListing:
    root: Path
    images: list[tuple[str, Path]]   # (relative posix name, path), sorted by name
    skipped: list[tuple[str, str]]   # (relative posix name, why)


SYMLINK_OUT = "a symlink out of the folder (--follow-symlinks to include it)"


def list_images(folder: str | os.PathLike, *, what: str = "folder", follow_symlinks: bool = False) -> FolderListing:
    """Every file under `folder` (recursively): images by extension, and the
    rest with the reason they are skipped. Hidden files and folders (starting
    with '.') are skipped too. A symlink (file or folder) that leads out of
    `folder` is skipped unless `follow_symlinks`, so that no file from
    elsewhere on the disk is sent to a service by accident; symlinked folders
    inside it are not walked twice, and with `follow_symlinks` a link back
    to a folder already walked is not followed (no loops)."""
    root = Path(folder)
    if not root.exists():
        raise UsageError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise UsageError(f"{what} {root} is not a folder")
    images: list[tuple[str, Path]] = []
    skipped: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def onerror(exc: OSError) -> None:
        name = Path(exc.filename).relative_to(root).as_posix() if exc.filename else str(root)
        skipped.append((name, f"cannot list: {exc.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=follow_symlinks):
        base = Path(dirpath)
        real = base.resolve()
        if real in seen:  # reached again through a symlink: walked once is enough
            dirnames[:] = []
            continue
        seen.add(real)
        keep = []
        for d in sorted(dirnames):
            sub = base / d
            if d.startswith("."):
                continue
            if sub.is_symlink():
                if sub.resolve() in seen:
                    continue  # a loop, or a folder walked already
                if not follow_symlinks:
                    if not _inside(root, sub):
                        skipped.append((sub.relative_to(root).as_posix(), SYMLINK_OUT))
                    continue
            keep.append(d)
        dirnames[:] = keep
        for filename in filenames:
            path = base / filename
            name = path.relative_to(root).as_posix()
            if filename.startswith("."):
                skipped.append((name, "hidden file"))
            elif not is_image_path(filename):
                skipped.append((name, "not an image (extension)"))
            elif not follow_symlinks and path.is_symlink() and not _inside(root, path):
                skipped.append((name, SYMLINK_OUT))
            elif not path.is_file():
                if os.path.lexists(path):  # else it was removed while the folder was walked
                    skipped.append((name, "not a regular file"))
            else:
                images.append((name, path))
    images.sort()
    skipped.sort()
    return FolderListing(root, images, skipped)


def _inside(root: Path, path: Path) -> bool:
    """Whether `path`, symlinks resolved, lies inside `root`."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def thumbnail_jpeg(path: Path, size: int) -> bytes | None:
    """A JPEG of the image fitting in size x size (EXIF orientation applied),
    or None when it cannot be read."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.draft("RGB", (size * 2, size * 2))  # fast JPEG downscale on decode
            img = ImageOps.exif_transpose(img)
            img.thumbnail((size, size))
            if img.mode != "RGB":
                img = img.convert("RGB")
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
    except Exception as exc:  # any undecodable file becomes a placeholder, never a crash
        log.debug("no thumbnail for %s: %s", path, exc)
        return None
    return buf.getvalue()
