"""The GPU path's CPU seams (CI has no GPU): batched decode + resize on a device
(run here on the CPU device) gives the inputs the PIL path gives, within
resampling differences. The GPU itself is exercised only by `python -m bench.embedder --device cuda`."""

from __future__ import annotations

import torch
from PIL import Image

from imagesearch.model.backbones import BACKBONES
from imagesearch.model.gpu import decode_batch
from imagesearch.model.preprocessing import load_tensor
from tests.helpers import encode, photo

SPEC = BACKBONES["efficientnet_lite0"].preprocess


def test_batched_device_decode_matches_the_pil_path_within_resampling():
    exif = Image.Exif()
    exif[0x0112] = 6
    datas = [encode(photo("astronaut", (640, 480)), "JPEG", quality=95),
             encode(photo("chelsea", (300, 451)), "JPEG", quality=95),
             encode(photo("coffee", (400, 300)).transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)]
    got = decode_batch(datas, SPEC, "cpu")
    assert got.shape == (3, 3, 224, 224) and got.dtype == torch.float32
    want = torch.stack([load_tensor(d, SPEC) for d in datas])
    diff = (got - want).abs()
    assert diff.mean() < 0.03, diff.mean()  # normalised units (range 2): resampling and IDCT differences only
    rotated_wrong = decode_batch(datas[2:], SPEC, "cpu")[0].transpose(1, 2)
    assert (rotated_wrong - want[2]).abs().mean() > 2 * diff[2].mean()  # orientation was applied

