"""Every kind of input the embedder takes or refuses, checked at the decoder
(imagesearch.model.preprocessing.decode_image, the one decoder) against pixels computed
independently. tests/test_embedder_service.py sends the same inputs through
the real server process."""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from imagesearch import errors
from imagesearch.model.preprocessing import decode_image
from tests.helpers import SIZE, encode, photo


def png16(a: np.ndarray) -> bytes:
    """A 16-bit grayscale (H, W) or RGB (H, W, 3) PNG, written by hand (PIL writes no 16-bit RGB)."""
    h, w = a.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2 if a.ndim == 3 else 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@dataclasses.dataclass(frozen=True)
class Case:
    """Encoded bytes and the RGB pixels they must decode to: exactly (`tolerance`
    0), within `tolerance` per pixel (rounding), or, for lossy formats
    (`expected` is the original), within `mean_tolerance` on average."""

    data: bytes
    expected: np.ndarray
    tolerance: int = 0
    mean_tolerance: float | None = None

    @property
    def exact(self) -> bool:
        return self.tolerance == 0 and self.mean_tolerance is None


def _exif_png(upright: Image.Image, orientation: int) -> bytes:
    """A PNG whose stored pixels need EXIF `orientation` to look like `upright`."""
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(upright.transpose(undo), "PNG", exif=exif)


def _rgba_case() -> Case:
    rgb = np.asarray(photo(), dtype=np.uint8)
    h, w = rgb.shape[:2]
    alpha = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    rgba = np.dstack([rgb, alpha])
    a = alpha[..., None] / 255.0
    expected = np.round(rgb * a + 255.0 * (1 - a)).astype(np.uint8)  # over white
    return Case(encode(Image.fromarray(rgba, "RGBA"), "PNG"), expected, tolerance=1)


def _cmyk_tiff_case() -> Case:
    rgb = np.asarray(photo(), dtype=np.uint8)
    cmyk = np.dstack([255 - rgb, np.zeros(rgb.shape[:2], np.uint8)])  # K = 0: RGB = 255 - CMY exactly
    return Case(encode(Image.fromarray(cmyk, "CMYK"), "TIFF"), rgb)


def _gray16_case() -> Case:
    gray = np.asarray(photo().convert("L"), dtype=np.uint16)
    noise = np.random.default_rng(0).integers(0, 128, gray.shape, dtype=np.uint16)
    # 257 * g + n (n < 128) scales back to g: 16-bit data is read as 16-bit, not clipped at 255.
    return Case(png16(gray * 257 + noise), np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2))


def _rgb16_case() -> Case:
    rgb = np.asarray(photo(), dtype=np.uint16)
    noise = np.random.default_rng(1).integers(0, 256, rgb.shape, dtype=np.uint16)
    return Case(png16(rgb * 256 + noise), rgb.astype(np.uint8), tolerance=1)


def _gif_case() -> Case:
    first, second = photo("chelsea").quantize(256), photo("coffee").quantize(256)
    data = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    return Case(data, np.asarray(first.convert("RGB")))


def _lossy(data: bytes, mean_tolerance: float = 6.0) -> Case:
    return Case(data, np.asarray(photo()), mean_tolerance=mean_tolerance)


def good_inputs() -> dict[str, Case]:
    """Name -> Case for every input kind the issue lists."""
    p = photo()
    rgb = np.asarray(p)
    gray = p.convert("L")
    palette = p.quantize(64)
    exif = Image.Exif()
    exif[0x0112] = 6
    cases = {
        "jpeg": _lossy(encode(p, "JPEG", quality=95)),
        "mpo_first_picture": _lossy(encode(p, "MPO", quality=95, save_all=True, append_images=[photo("coffee")])),
        "png": Case(encode(p, "PNG"), rgb),
        "webp_lossless": Case(encode(p, "WEBP", lossless=True), rgb),
        "webp_lossy": _lossy(encode(p, "WEBP", quality=90)),
        "bmp": Case(encode(p, "BMP"), rgb),
        "gif_first_frame": _gif_case(),
        "tiff": Case(encode(p, "TIFF"), rgb),
        "tiff_lzw": Case(encode(p, "TIFF", compression="tiff_lzw"), rgb),
        "exif_rotate90_png": Case(_exif_png(p, 6), rgb),
        "exif_rotate180_png": Case(_exif_png(p, 3), rgb),
        "exif_rotate270_png": Case(_exif_png(p, 8), rgb),
        "exif_rotate90_jpeg": _lossy(encode(p.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)),
        "grayscale": Case(encode(gray, "PNG"), np.repeat(np.asarray(gray)[..., None], 3, axis=2)),
        "palette": Case(encode(palette, "PNG"), np.asarray(palette.convert("RGB"))),
        "rgba": _rgba_case(),
        "cmyk_tiff": _cmyk_tiff_case(),
        "cmyk_jpeg": _lossy(encode(p.convert("CMYK"), "JPEG", quality=95), mean_tolerance=8.0),
        "gray16_png": _gray16_case(),
        "rgb16_png": _rgb16_case(),
    }
    return cases


def _random(n: int) -> bytes:
    return np.random.default_rng(7).integers(0, 256, n, dtype=np.uint8).tobytes()


def _bomb_png(width: int, height: int) -> bytes:
    """A real, tiny PNG with width x height 1-bit pixels."""
    return encode(Image.new("1", (width, height)), "PNG")


def bad_inputs(max_image_bytes: int, max_image_pixels: int) -> dict[str, tuple[bytes, type, str]]:
    """Name -> (bytes, the domain error, a word the message must hold)."""
    jpeg = encode(photo(), "JPEG", quality=95)
    png = encode(photo(), "PNG")
    side = int(max_image_pixels ** 0.5) + 100
    return {
        "empty": (b"", errors.InvalidImage, "empty"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], errors.InvalidImage, "truncated"),
        "truncated_png": (png[: len(png) // 2], errors.InvalidImage, "truncated"),
        "random_bytes": (_random(5000), errors.InvalidImage, "not a recognised image"),
        "text_file": (b"name,class\nshirt.jpg,shirt\n" * 20, errors.InvalidImage, "not a recognised image"),
        "plain_pbm_text": (b"P1\n2 2\n0 1\n1 0\n", errors.InvalidImage, "not a recognised image"),
        "over_pixel_limit": (_bomb_png(side, side), errors.ResourceExhausted, "pixels"),
        "forged_huge_header": (_forged_png(100_000, 100_000), errors.ResourceExhausted, "pixels"),
        "over_byte_limit": (_random(max_image_bytes + 1), errors.ResourceExhausted, "bytes"),
    }


def _forged_png(width: int, height: int) -> bytes:
    """A PNG header that claims width x height with almost no data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


GOOD = good_inputs()
LIMIT_BYTES, LIMIT_PIXELS = 1_000_000, 4_000_000
BAD = bad_inputs(LIMIT_BYTES, LIMIT_PIXELS)


def check_pixels(case: Case, got: np.ndarray) -> None:
    assert got.shape == case.expected.shape, (got.shape, case.expected.shape)
    diff = np.abs(got.astype(np.int16) - case.expected.astype(np.int16))
    if case.mean_tolerance is not None:
        assert diff.mean() <= case.mean_tolerance, diff.mean()
    else:
        assert diff.max() <= case.tolerance, diff.max()


@pytest.mark.parametrize("name", sorted(GOOD))
def test_decodes_to_the_expected_rgb_pixels(name):
    img = decode_image(GOOD[name].data, name=name)
    assert img.mode == "RGB"
    check_pixels(GOOD[name], np.asarray(img))


def test_the_cases_are_what_they_claim():
    """Guard against a builder quietly producing plain RGB: the stored files
    really have the modes, frames and EXIF tags the cases are about."""
    def opened(name):
        return Image.open(io.BytesIO(GOOD[name].data))

    assert {opened(n).format for n in ("jpeg", "png", "webp_lossy", "bmp", "gif_first_frame", "tiff")} == {
        "JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"}
    assert opened("grayscale").mode == "L"
    assert opened("palette").mode == "P"
    assert opened("rgba").mode == "RGBA"
    assert opened("cmyk_tiff").mode == "CMYK" and opened("cmyk_jpeg").mode == "CMYK"
    assert opened("gray16_png").mode.startswith("I")
    assert opened("gif_first_frame").n_frames == 2
    assert opened("mpo_first_picture").format == "MPO" and opened("mpo_first_picture").n_frames == 2
    assert opened("exif_rotate90_png").getexif()[0x0112] == 6
    assert opened("exif_rotate90_png").size == (SIZE[1], SIZE[0])  # stored sideways
    second = opened("gif_first_frame")
    second.seek(1)
    frame_gap = np.abs(np.asarray(second.convert("RGB"), np.int16) - GOOD["gif_first_frame"].expected).mean()
    assert frame_gap > 20  # the frames differ, so "first frame" is a real check


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_raises_a_domain_error_naming_the_item(name):
    data, error, word = BAD[name]
    with pytest.raises(error) as info:
        decode_image(data, name=f"upload-{name}", max_bytes=LIMIT_BYTES, max_pixels=LIMIT_PIXELS)
    assert f"upload-{name}" in str(info.value)
    assert word in str(info.value)
