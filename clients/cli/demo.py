"""The demo's data: real photos that ship inside installed packages
(scikit-image's data folder, scikit-learn's sample images) as the gallery, and
altered copies of them (crop, flip, colour, resize, rotation, blur) as the queries,
with the ground truth that says which gallery photo each query came from.

The photos are read straight from the packages' folders (found with
importlib, without importing those packages, which would take seconds)."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from clients.errors import ClientError
from imagesearch.extras import install_command

# Real photographs in scikit-image's data folder (its synthetic images are left out).
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png", "moon.png",
    "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
# The stereo pair shows the same scene: a query made from one is relevant to both.
SAME_SCENE = {"motorcycle_left.png": "motorcycle_right.png", "motorcycle_right.png": "motorcycle_left.png"}
MIN_PHOTOS = 20
ALTERATIONS = ("crop", "flip", "colour", "resize", "rotate", "blur")


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def find_photos() -> list[Path]:
    photos: list[Path] = []
    skimage = _package_dir("skimage")
    if skimage is not None:
        photos += [skimage / "data" / n for n in SKIMAGE_PHOTOS if (skimage / "data" / n).is_file()]
    sklearn = _package_dir("sklearn")
    if sklearn is not None:
        photos += [sklearn / "datasets" / "images" / n for n in SKLEARN_PHOTOS
                   if (sklearn / "datasets" / "images" / n).is_file()]
    if len(photos) < MIN_PHOTOS:
        raise ClientError(f"the demo needs at least {MIN_PHOTOS} photos from scikit-image and scikit-learn, "
                          f"found {len(photos)}: {install_command('demo')}")
    return photos


def alter(img, how: str, rng: random.Random):
    """An altered copy of a PIL image, as a visitor's photo of it might be."""
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    img = img.convert("RGB")
    w, h = img.size
    if how == "crop":
        f = rng.uniform(0.6, 0.8)
        cw, ch = int(w * f), int(h * f)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        return img.crop((x, y, x + cw, y + ch))
    if how == "flip":
        return ImageOps.mirror(img)
    if how == "colour":
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.3, 1.8))
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
        return ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.3))
    if how == "resize":
        f = rng.uniform(0.3, 0.5)
        return img.resize((max(16, int(w * f)), max(16, int(h * f))), Image.Resampling.BILINEAR)
    if how == "rotate":
        return img.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BICUBIC, expand=False)
    if how == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(1.5, 3.0)))
    raise ValueError(f"unknown alteration {how!r}")


def build(out_dir: str | Path, *, seed: int = 0) -> tuple[Path, Path, Path, dict[str, list[str]]]:
    """Write gallery/, query/ and ground_truth.json under `out_dir`.
    Returns (gallery dir, query dir, ground-truth path, ground truth)."""
    from PIL import Image

    out = Path(out_dir)
    gallery, query = out / "gallery", out / "query"
    gallery.mkdir(parents=True, exist_ok=True)
    query.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    truth: dict[str, list[str]] = {}
    for i, path in enumerate(find_photos()):
        name = path.stem + ".jpg"
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.save(gallery / name, quality=92)
            how = ALTERATIONS[i % len(ALTERATIONS)]
            # Two changes per query: the listed one and a random other one.
            second = rng.choice([a for a in ALTERATIONS if a != how])
            altered = alter(alter(img, how, rng), second, rng)
        qname = f"{path.stem}-{how}-{second}.jpg"
        altered.save(query / qname, quality=88)
        relevant = [name]
        if path.name in SAME_SCENE:
            relevant.append(Path(SAME_SCENE[path.name]).stem + ".jpg")
        truth[qname] = sorted(relevant)
    gt_path = out / "ground_truth.json"
    gt_path.write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
    return gallery, query, gt_path, truth
