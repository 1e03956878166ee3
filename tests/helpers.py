"""Images the tests share: a real photo at a size, encoded bytes, a tiny
labelled ImageFolder data set, a gallery/query photo set with ground truth.

Fixtures live in conftest.py. What the benchmarks need too (the service
launcher, photos as JPEG bytes, unit vectors, the float64 reference ranking)
lives in testkit."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageDraw

from clients.cli import demo

SIZE = (180, 120)  # (width, height) of the test photos
COLORS = {"blue": (30, 40, 210), "green": (30, 190, 40), "red": (215, 35, 30)}


def photo(name: str = "chelsea", size=SIZE) -> Image.Image:
    """A real photo (scikit-image sample), RGB, at `size`."""
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size, Image.Resampling.BICUBIC)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def make_dataset(root: Path, n_train: int = 6, n_val: int = 3, bad_files: bool = True) -> Path:
    """Three colour classes of small JPEG/PNG photos-to-be, plus (optionally)
    one corrupt and one truncated file in train/red."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for name, colour in COLORS.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.clip(np.array(colour) + rng.integers(-30, 30, 3), 0, 255)
                pixels = np.clip(base + rng.normal(0, 12, (40, 48, 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(pixels, "RGB")
                ImageDraw.Draw(img).ellipse((6, 6, 6 + 10 + 3 * i, 30), fill=(250, 250, 250))
                img.save(d / (f"{i}.jpg" if i % 2 else f"{i}.png"))
    if bad_files:
        (root / "train" / "red" / "corrupt.jpg").write_bytes(b"this is not a JPEG")
        whole = (root / "train" / "red" / "1.jpg").read_bytes()
        (root / "train" / "red" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return root


def make_photo_set(folder: Path, n: int = 6) -> tuple[Path, Path, dict]:
    """A small gallery of real photos (plus a non-image and a broken image)
    and altered-copy queries, via the demo's builder, trimmed to n photos."""
    gallery, query, _, truth = demo.build(folder / "data", seed=1)
    keep = sorted(truth)[:n]
    for q in sorted(truth):
        if q not in keep:
            (query / q).unlink()
    truth = {q: truth[q] for q in keep}
    keep_gallery = {g for q in keep for g in truth[q]} | {"coffee.jpg"}
    for g in gallery.iterdir():
        if g.name not in keep_gallery:
            g.unlink()
    (gallery / "README.txt").write_text("not an image")
    (gallery / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return gallery, query, truth
