"""The one preprocessing path: bytes -> RGB image -> normalised tensor.

The trainer, the embedder service and the benchmarks all call these
functions, so a vector computed anywhere comes from the same pixels.

- `decode_image(data)`: any common encoded image to an RGB PIL image, with
  EXIF orientation applied, limits enforced and clear errors for bad input.
- `PreprocessSpec`: input size, mean/std and interpolation of a model.
- `eval_transform(spec)` / `train_transform(spec, recipe)`: PIL image -> tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import struct
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from imagesearch import errors
from imagesearch.defaults import IMAGE_EXTENSIONS, is_image_path  # noqa: F401 (re-exported)
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
    normalised by `mean`/`std`, resized with `interpolation`."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __post_init__(self):
        if self.input_size < 8:
            raise errors.InvalidArgument(f"input size {self.input_size} is too small (at least 8)")
        if self.interpolation not in _INTERPOLATIONS:
            raise errors.InvalidArgument(
                f"unknown interpolation {self.interpolation!r}; one of {sorted(_INTERPOLATIONS)}")
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        return cls(int(d["input_size"]), tuple(d["mean"]), tuple(d["std"]), d.get("interpolation", "bicubic"))


def _describe(name: str) -> str:
    return f"{name}: " if name else ""


def decode_image(
    data: bytes,
    *,
    name: str = "",
    max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Decode JPEG/PNG/WebP/BMP/GIF (first frame)/TIFF bytes to an 8-bit RGB image.

    EXIF orientation is applied. Grayscale, palette, RGBA/LA (composited on
    white), CMYK and 16/32-bit images become RGB. Raises `errors.InvalidImage`
    for empty, truncated or non-image bytes and `errors.ResourceExhausted`
    for input over `max_bytes` or `max_pixels`; `name` prefixes the message.
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
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
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


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        top = 255.0 if arr.max(initial=0) > 1.0 else 1.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
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


AUGMENTATIONS = ("default", "seed")
# RandomResizedCrop's area range: the eval transform keeps the whole object, so
# the crops stay large (torchvision's (0.08, 1) loses the object too often).
CROP_SCALE = (0.25, 1.0)


def train_transform(spec: PreprocessSpec, recipe: str = "default") -> transforms.Compose:
    """Training augmentation, then the eval pipeline's tensor steps.

    - "default": RandomResizedCrop (area 25-100 %), horizontal flip,
      TrivialAugmentWide (one random op at a random strength per image).
    - "seed": the seed notebook's: square resize, sharpness, rotation 30,
      colour jitter, perspective, horizontal flip.
    """
    interpolation = _INTERPOLATIONS[spec.interpolation]
    if recipe == "default":
        steps = [
            transforms.RandomResizedCrop(spec.input_size, scale=CROP_SCALE, interpolation=interpolation,
                                         antialias=True),
            transforms.RandomHorizontalFlip(),
            transforms.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR),
        ]
    elif recipe == "seed":
        steps = [
            transforms.Resize((spec.input_size, spec.input_size), interpolation=interpolation, antialias=True),
            transforms.RandomAdjustSharpness(2, p=0.2),
            transforms.RandomRotation(30),
            transforms.ColorJitter(brightness=0.5, hue=0.3),
            transforms.RandomPerspective(0.6, p=0.3),
            transforms.RandomHorizontalFlip(),
        ]
    else:
        raise errors.InvalidArgument(f"unknown augmentation recipe {recipe!r}; one of {', '.join(AUGMENTATIONS)}")
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])


def preprocess(img: Image.Image, spec: PreprocessSpec) -> torch.Tensor:
    """One RGB image -> its (3, S, S) float tensor for the model."""
    return eval_transform(spec)(img)


def load_tensor(data: bytes, spec: PreprocessSpec, *, name: str = "",
                max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
                max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Encoded bytes -> model input tensor: decode_image + preprocess."""
    return preprocess(decode_image(data, name=name, max_bytes=max_bytes, max_pixels=max_pixels), spec)

