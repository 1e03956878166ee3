"""Reduced JPEG decode (PreprocessSpec.decode = "draft"): JPEGs are decoded at
the smallest DCT scale whose sides still cover the input size, in the one
decode function the trainer and the embedder share; the decode mode is part
of the spec and of the fingerprint. Also: float and 16-bit images convert
exactly as before, in strips."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from imagesearch.model.backbones import BACKBONES, fingerprint
from imagesearch.model.preprocessing import (
    PreprocessSpec,
    decode_image,
    eval_transform,
    load_tensor,
)
from tests.helpers import encode, photo

SPEC = BACKBONES["efficientnet_lite0"].preprocess  # 224, draft


def jpeg(size, **kw) -> bytes:
    return encode(photo("astronaut", size), "JPEG", quality=90, **kw)


@pytest.mark.parametrize("size, reduce_to, expected", [
    ((4000, 3000), 224, (500, 375)),     # 1/8: 375 >= 224
    ((4000, 3000), 380, (1000, 750)),    # 1/4: 1/8 would give 375 < 380
    ((1000, 750), 224, (500, 375)),      # 1/2
    ((600, 300), 224, (600, 300)),       # 300 // 224 = 1: no reduction
    ((300, 3000), 224, (300, 3000)),     # the short side decides
    ((224, 224), 224, (224, 224)),
])
def test_jpeg_is_decoded_at_the_smallest_scale_that_covers_the_input(size, reduce_to, expected):
    img = decode_image(jpeg(size), reduce_to=reduce_to)
    assert img.size == expected and img.mode == "RGB"
    assert min(img.size) >= min(reduce_to, *size)
    assert decode_image(jpeg(size)).size == size  # without reduce_to: every pixel


def test_other_formats_and_rotated_jpegs():
    png = encode(photo("astronaut", (1000, 800)), "PNG")
    assert decode_image(png, reduce_to=224).size == (1000, 800)  # no DCT to scale
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    rotated = jpeg((1600, 1200), exif=exif)
    assert decode_image(rotated, reduce_to=224).size == (300, 400)
    assert decode_image(rotated).size == (1200, 1600)


def test_draft_pixels_stay_close_to_full_decode_after_preprocessing():
    data = jpeg((4000, 3000))
    full = dataclasses.replace(SPEC, decode="full")
    a, b = load_tensor(data, SPEC), load_tensor(data, full)
    assert a.shape == b.shape == (3, 224, 224)
    assert 0 < (a - b).abs().mean() < 0.02  # differs (it is a real reduction), slightly


def test_decode_mode_is_part_of_the_spec_and_the_fingerprint():
    model = torch.nn.Linear(2, 2)
    full = dataclasses.replace(SPEC, decode="full")
    assert SPEC.decode == "draft" and SPEC.decode_size == 224 and full.decode_size is None
    assert fingerprint(model, SPEC, "x") != fingerprint(model, full, "x")
    assert PreprocessSpec.from_dict(SPEC.to_dict()) == SPEC
    assert PreprocessSpec.from_dict(full.to_dict()) == full
    with pytest.raises(ValueError, match="decode mode"):
        PreprocessSpec(224, (0.5,) * 3, (0.5,) * 3, decode="fast")


def test_the_trainer_decodes_the_pixels_the_embedder_does(tmp_path):
    from trainer.data import ImageFiles

    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg((2000, 1500)))
    ds = ImageFiles([(str(path), 0)], eval_transform(SPEC), reduce_to=SPEC.decode_size)
    tensor, target = ds[0]
    assert target == 0 and torch.equal(tensor, load_tensor(path.read_bytes(), SPEC))


# ---------------------------------------------------------------- 16/32-bit conversion, in strips


def _float_tiff(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.float32), "F").save(buf, "TIFF", compression="tiff_deflate")
    return buf.getvalue()


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_float_images_convert_as_documented(scale, monkeypatch):
    from imagesearch.model import preprocessing

    monkeypatch.setattr(preprocessing, "_STRIP_PIXELS", 37 * 5)  # many strips, a ragged last one
    rng = np.random.default_rng(3)
    a = rng.random((50, 37)) * scale
    a[0, 0], a[1, 1], a[2, 2] = np.nan, np.inf, -np.inf
    clean = np.nan_to_num(a.astype(np.float32).astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    top = 255.0 if clean.max() > 1.0 else 1.0
    want = np.clip(clean / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    got = np.asarray(decode_image(_float_tiff(a)))
    assert got.shape == (50, 37, 3)
    assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 1], want)
