"""Fuzzing the one image decoder: random, truncated and bit-flipped real
images and forged headers. The decoder either returns an RGB image within the
limits or raises InvalidImage / ResourceExhausted; never anything else."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imagesearch import errors
from imagesearch.model.preprocessing import decode_image

MAX_PIXELS = 4_000_000


def _encode(fmt: str, mode: str = "RGB", size=(64, 48)) -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


SEEDS = {
    "jpeg": _encode("JPEG"),
    "png": _encode("PNG"),
    "png_p": _encode("PNG", "P"),
    "webp": _encode("WEBP"),
    "bmp": _encode("BMP"),
    "gif": _encode("GIF", "P"),
    "tiff": _encode("TIFF"),
    "tiff_cmyk": _encode("TIFF", "CMYK"),
}


def _check(data: bytes) -> None:
    try:
        img = decode_image(data, name="fuzz", max_pixels=MAX_PIXELS)
    except (errors.InvalidImage, errors.ResourceExhausted) as exc:
        assert "fuzz" in str(exc)
        return
    assert img.mode == "RGB"
    assert 0 < img.width * img.height <= MAX_PIXELS


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    _check(data)


@FUZZ
@given(st.sampled_from(sorted(SEEDS)), st.floats(0, 1))
def test_truncated_real_images(fmt, fraction):
    data = SEEDS[fmt]
    _check(data[: int(len(data) * fraction)])


@FUZZ
@given(st.sampled_from(sorted(SEEDS)), st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 7)),
                                                min_size=1, max_size=12))
def test_bit_flipped_real_images(fmt, flips):
    data = bytearray(SEEDS[fmt])
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    _check(bytes(data))


def _png_header(width: int, height: int, bit_depth=8, colour=2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = zlib.compress(b"\x00" * 64)
    idat_chunk = b"IDAT" + idat
    return (b"\x89PNG\r\n\x1a\n" + body + struct.pack(">I", len(idat)) + idat_chunk
            + struct.pack(">I", zlib.crc32(idat_chunk)) + b"\x00\x00\x00\x00IEND\xaeB`\x82")


@FUZZ
@given(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1))
def test_forged_huge_png_dimensions(width, height):
    _check(_png_header(width, height))


def test_declared_dimensions_over_the_limit_are_resource_exhausted():
    with pytest.raises(errors.ResourceExhausted, match="pixels"):
        decode_image(_png_header(100_000, 100_000), name="bomb.png", max_pixels=MAX_PIXELS)


@FUZZ
@given(st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F"]),
       st.sampled_from(["PNG", "TIFF", "WEBP", "BMP", "GIF", "JPEG"]),
       st.integers(1, 80), st.integers(1, 80))
def test_odd_modes_and_sizes_become_rgb(mode, fmt, w, h):
    img = Image.new(mode, (w, h))
    buf = io.BytesIO()
    try:
        img.save(buf, fmt)
    except (OSError, ValueError, KeyError):
        return  # this format cannot hold this mode: nothing to decode
    out = decode_image(buf.getvalue(), name="odd")
    assert out.mode == "RGB" and out.size == (w, h)
