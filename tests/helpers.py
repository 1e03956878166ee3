"""Image helpers the tests share (fixtures live in conftest.py; vectors, the
reference ranking, photos as JPEG bytes and the service launcher, which the
benchmarks use too, in imagesearch.testing)."""

from __future__ import annotations

import io

import skimage.data
from PIL import Image

SIZE = (180, 120)  # (width, height) of the test photos


def photo(name: str = "chelsea", size=SIZE) -> Image.Image:
    """A real photo (scikit-image sample), RGB, at `size`."""
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size, Image.Resampling.BICUBIC)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()
