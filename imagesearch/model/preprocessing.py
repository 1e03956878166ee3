"""The one preprocessing path: bytes -> RGB image -> normalised tensor.

The trainer, the embedder service and the benchmarks all call these
functions, so a vector computed anywhere comes from the same pixels.

- `decode_image(data)`: any common encoded image to an RGB PIL image, with
  EXIF orientation applied, limits enforced and clear errors for bad input;
  with `reduce_to`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4,
  1/8) whose sides still cover it (Pillow's draft mode; bench/results/decode.md).
  Memory: at most 8 bytes a pixel of the image at the peak (PIL holds RGB,
  RGBA, F and I images in 4 bytes a pixel: the decoded image plus one such
  copy), never float64 copies.
- `PreprocessSpec`: input size, mean/std, interpolation and decode mode of a model.
- `eval_transform(spec)` / `train_transform(spec, augment)`: PIL image -> tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import struct
import warnings

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from imagesearch import errors
from imagesearch.defaults import DECODE_MODES, IMAGE_EXTENSIONS, is_image_path  # noqa: F401 (re-exported)
from imagesearch.defaults import MAX_IMAGE_BYTES as DEFAULT_MAX_IMAGE_BYTES
from imagesearch.defaults import MAX_IMAGE_PIXELS as DEFAULT_MAX_IMAGE_PIXELS

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half an image

# The only PIL plugins decode_image lets loose on untrusted bytes ("JPEG" covers
# the multi-picture MPO files of phone cameras). Others are refused as "not a
# recognised image": EPS would run Ghostscript, and PPM or XBM accept plain text.
DECODE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

_INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """How a model wants its input: square `input_size`, RGB in [0, 1]
    normalised by `mean`/`std`, resized with `interpolation`, from JPEGs
    decoded in `decode` mode ("draft": at the smallest DCT scale whose sides
    cover `input_size`; "full": every pixel). The decode mode changes pixels
    (a 4000x3000 photo's Lite0 vector moves by up to 8e-3), so it is part of
    the spec and of the model fingerprint."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    decode: str = "draft"

    def __post_init__(self):
        if self.input_size < 8:
            raise errors.InvalidArgument(f"input size {self.input_size} is too small (at least 8)")
        if self.interpolation not in _INTERPOLATIONS:
            raise errors.InvalidArgument(
                f"unknown interpolation {self.interpolation!r}; one of {sorted(_INTERPOLATIONS)}")
        if self.decode not in DECODE_MODES:
            raise errors.InvalidArgument(f"unknown decode mode {self.decode!r}; one of {', '.join(DECODE_MODES)}")
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def decode_size(self) -> int | None:
        """The `reduce_to` of decode_image: the side both resized sides need."""
        return self.input_size if self.decode == "draft" else None

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        return cls(int(d["input_size"]), tuple(d["mean"]), tuple(d["std"]), d["interpolation"], d["decode"])


def _describe(name: str) -> str:
    return f"{name}: " if name else ""


def decode_image(
    data: bytes,
    *,
    name: str = "",
    max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    reduce_to: int | None = None,
) -> Image.Image:
    """Decode JPEG/PNG/WebP/BMP/GIF (first frame)/TIFF bytes to an 8-bit RGB image.

    EXIF orientation is applied. Grayscale, palette, RGBA/LA (composited on
    white), CMYK and 16/32-bit images become RGB. With `reduce_to`, a JPEG is
    decoded at the smallest DCT scale whose width and height are both at
    least `reduce_to` (other formats, and JPEGs too small to reduce, at full
    size). Raises `errors.InvalidImage` for empty, truncated or non-image
    bytes and `errors.ResourceExhausted` for input over `max_bytes` or
    `max_pixels` (checked on the declared size); `name` prefixes the message.
    """
    label = _describe(name)
    if not data:
        raise errors.InvalidImage(f"{label}empty image: 0 bytes")
    if max_bytes is not None and len(data) > max_bytes:
        raise errors.ResourceExhausted(
            f"{label}image is {len(data):,} bytes, over the limit of {max_bytes:,} bytes")
    try:
        if max_pixels is None:
            with warnings.catch_warnings():  # no limit of ours: PIL's bomb guard is the limit
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
        else:
            # Our limit decides, below, and names itself in the message. (No
            # catch_warnings here: it swaps process-wide filters, which is not
            # thread-safe, and the embedder decodes on a thread pool.)
            img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise errors.ResourceExhausted(
                f"{label}image is {width}x{height} = {width * height:,} pixels, "
                f"over the limit of {max_pixels:,} pixels")
        if width < 1 or height < 1:
            raise errors.InvalidImage(f"{label}image has no pixels ({width}x{height})")
        img.seek(0)  # first frame of GIF/APNG/multi-page TIFF
        if reduce_to is not None and img.format in ("JPEG", "MPO"):
            img.draft(img.mode, (reduce_to, reduce_to))
        img.load()
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        img = _to_8bit(img)  # rebinding drops the 4-byte-a-pixel F / I image
        img = _to_rgb(img)
        return _transpose(img, orientation)
    except errors.ImageSearchError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        limit = f" of {max_pixels:,} pixels" if max_pixels is not None else ""
        raise errors.ResourceExhausted(f"{label}image over the pixel limit{limit}: {exc}") from None
    except Image.UnidentifiedImageError:
        raise errors.InvalidImage(
            f"{label}not a recognised image ({len(data):,} bytes; "
            f"expected JPEG, PNG, WebP, BMP, GIF or TIFF)") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError,
            KeyError, ZeroDivisionError, struct.error, MemoryError) as exc:
        # PIL reports truncated and corrupt files through many exception types.
        raise errors.InvalidImage(f"{label}corrupt or truncated image: {exc}") from None


# Rows of a 16/32-bit image converted at a time: about this many pixels, so the
# float64 working copy stays a few MB whatever the image size.
_STRIP_PIXELS = 1 << 20

_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _transpose(img: Image.Image, orientation) -> Image.Image:
    """Apply an EXIF orientation (ImageOps.exif_transpose without its copy of
    an image that needs no turn)."""
    method = _TRANSPOSES.get(orientation)
    return img if method is None else img.transpose(method)


def _strips(img: Image.Image):
    """(row slice, float64 array of those rows) over the image, a few MB at a time."""
    width, height = img.size
    rows = max(1, _STRIP_PIXELS // max(1, width))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        yield slice(top, bottom), np.asarray(img.crop((0, top, width, bottom)), dtype=np.float64)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float images -> 8-bit grayscale ("L"), scaled:
    I;16 by 65535; I by 65535 when any value passes 255, else 255; F (NaN -> 0,
    +inf -> 1, -inf -> 0) by 255 when any value passes 1, else 1. Converted in
    strips into one uint8 array: 1 byte a pixel beside the source. Other modes
    pass through."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        top = 65535.0 if mode.startswith("I;16") else (255.0 if img.getextrema()[1] <= 255 else 65535.0)

        def clean(a):
            return a
    elif mode == "F":
        def clean(a):
            return np.nan_to_num(a, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
        top = 1.0
        for _, strip in _strips(img):
            if clean(strip).max(initial=0) > 1.0:
                top = 255.0
                break
    else:
        return img
    out = np.empty((img.size[1], img.size[0]), dtype=np.uint8)
    for rows, strip in _strips(img):
        strip = clean(strip)
        strip /= top
        strip *= 255.0
        strip += 0.5
        out[rows] = np.clip(strip, 0, 255, out=strip)
    return Image.fromarray(out, "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        # Pasting through its own alpha onto white gives exactly alpha_composite's
        # pixels, with one RGB copy instead of three RGBA ones.
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, (0, 0), rgba)
        return background
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, ...


@functools.lru_cache(maxsize=16)
def eval_transform(spec: PreprocessSpec) -> transforms.Compose:
    """Resize to a square (no crop: the whole object stays), to tensor, normalise."""
    return transforms.Compose([
        transforms.Resize((spec.input_size, spec.input_size),
                          interpolation=_INTERPOLATIONS[spec.interpolation], antialias=True),
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])


AUGMENTATIONS = ("strong", "seed")
# RandomResizedCrop's area range: the eval transform keeps the whole object, so
# the crops stay large (torchvision's (0.08, 1) loses the object too often).
CROP_SCALE = (0.25, 1.0)


def train_transform(spec: PreprocessSpec, augment: str = "strong") -> transforms.Compose:
    """Training augmentation, then the eval pipeline's tensor steps.

    - "strong": RandomResizedCrop (area 25-100 %), horizontal flip,
      TrivialAugmentWide (one random op at a random strength per image).
    - "seed": the seed notebook's: square resize, sharpness, rotation 30,
      colour jitter, perspective, horizontal flip.
    """
    interpolation = _INTERPOLATIONS[spec.interpolation]
    if augment == "strong":
        steps = [
            transforms.RandomResizedCrop(spec.input_size, scale=CROP_SCALE, interpolation=interpolation,
                                         antialias=True),
            transforms.RandomHorizontalFlip(),
            transforms.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR),
        ]
    elif augment == "seed":
        steps = [
            transforms.Resize((spec.input_size, spec.input_size), interpolation=interpolation, antialias=True),
            transforms.RandomAdjustSharpness(2, p=0.2),
            transforms.RandomRotation(30),
            transforms.ColorJitter(brightness=0.5, hue=0.3),
            transforms.RandomPerspective(0.6, p=0.3),
            transforms.RandomHorizontalFlip(),
        ]
    else:
        raise errors.InvalidArgument(f"unknown augmentation {augment!r}; one of {', '.join(AUGMENTATIONS)}")
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])


def load_tensor(data: bytes, spec: PreprocessSpec, *, name: str = "",
                max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
                max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Encoded bytes -> the model's (3, S, S) float input tensor: decode_image (in
    the spec's decode mode), then eval_transform."""
    image = decode_image(data, name=name, max_bytes=max_bytes, max_pixels=max_pixels, reduce_to=spec.decode_size)
    return eval_transform(spec)(image)

