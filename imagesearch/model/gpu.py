"""The GPU input path: a batch of JPEG bytes decoded on the device and resized there.

`decode_batch(datas, spec, device)` decodes with `torchvision.io.decode_jpeg`
(nvJPEG, batched, on a CUDA device; libjpeg on the CPU, which is how CI tests
this seam), applies EXIF orientation, resizes each image to `S x S` with
antialiased bicubic interpolation, clamps to [0, 1] as Pillow's 8-bit resize
does, and normalises: the tensor `load_tensor` would give, from a full decode
(nvJPEG has no DCT scaling) and torch's resize, so within a few 1e-2 of it,
not equal. The service decodes with `decode_image` on CPU threads; this path
is what `python -m bench.embedder --device cuda` measures against the model's
own forward ceiling. It has not run on a GPU yet.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from imagesearch.model.preprocessing import PreprocessSpec


def decode_batch(datas: Sequence[bytes], spec: PreprocessSpec, device: str | torch.device) -> torch.Tensor:
    """JPEG bytes -> (N, 3, S, S) float32 normalised inputs on `device`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    images = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    size = spec.input_size
    mode = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}[spec.interpolation]
    out = torch.empty((len(images), 3, size, size), device=device, dtype=torch.float32)
    for i, img in enumerate(images):
        x = img.unsqueeze(0).float().div_(255.0)
        kwargs = {"antialias": True, "align_corners": False} if mode != "nearest" else {}
        out[i] = F.interpolate(x, size=(size, size), mode=mode, **kwargs)[0]
    out.clamp_(0.0, 1.0)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    return out.sub_(mean).div_(std)
