"""`python -m bench.embedder --device cuda`: the GPU path against the model's own ceiling.

At the same batch size, torch fp16 (autocast), in one process:
- forward ceiling: the forward pass alone on a batch already on the GPU;
- GPU decode + forward: JPEG bytes decoded in batches on the GPU
  (`decode_batch` below: nvJPEG, resize and normalise there), then the forward;
- CPU decode + forward: `Embedder.embed_images` (Pillow on the CPU, serially);
- the service (`--device cuda`), one EmbedStream, decode threads on the CPU.
Each rate is printed with its ratio to the ceiling (target >= 0.8 with decode included).
No GPU figure yet.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from bench.embedder import real_photos, run_stream, take
from embedder_service.embedder import Embedder
from imagesearch.model.preprocessing import PreprocessSpec
from testkit import ServiceProcess
from imagesearch.v1 import embedder_pb2_grpc


def decode_batch(datas: Sequence[bytes], spec: PreprocessSpec, device: str | torch.device) -> torch.Tensor:
    """JPEG bytes -> (N, 3, S, S) float32 normalised inputs on `device`: decoded
    with torchvision's decode_jpeg (nvJPEG, batched, on CUDA), EXIF orientation
    applied, antialiased bicubic resize to S x S, clamped to [0, 1] as Pillow's
    8-bit resize does, normalised. Within a few 1e-2 of the service's decode
    (a full decode: nvJPEG has no DCT scaling), not equal: a measure of what a
    decode on the GPU could give, not a path the service takes."""
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


def _timed(fn, n_images: int, repeats: int) -> float:
    """Median images/s of `fn()` (which handles `n_images` images) over `repeats` runs."""
    rates = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        rates.append(n_images / (time.perf_counter() - start))
    return statistics.median(rates)


def main(args, batch: int, n_images: int) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    source, photos = real_photos()
    images = take(photos, n_images)
    chunks = [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)]
    n = len(chunks) * batch
    plain = Embedder.load(backbone=args.backbone, device="cuda", engine="torch", max_batch=batch)
    plain.warm_up([batch])
    x = decode_batch(chunks[0], plain.spec, "cuda")
    rows = {
        "forward ceiling (eager, fp16)": lambda: [plain.engine(x) for _ in chunks],
        "GPU decode + forward": lambda: [plain.engine(decode_batch(c, plain.spec, "cuda")) for c in chunks],
        "CPU decode + forward": lambda: [plain.embed_images(c) for c in chunks],
    }
    for fn in rows.values():
        fn()  # warm
    rates = {name: _timed(fn, n, args.repeats) for name, fn in rows.items()}
    service_args = ["--backbone", args.backbone, "--device", "cuda", "--engine", "torch",
                    "--max-batch", str(batch), "--max-wait-ms", str(args.max_wait_ms)]
    with ServiceProcess("embedder_service", *service_args, startup_timeout=600) as proc, proc.channel() as ch:
        stub = embedder_pb2_grpc.EmbedderServiceStub(ch)
        run_stream(stub, images[:2 * batch])
        rates["service EmbedStream (CPU decode threads)"] = statistics.median(
            n_images / run_stream(stub, images) for _ in range(args.repeats))
    ceiling = rates["forward ceiling (eager, fp16)"]
    print(f"{n} images from {source}; {args.backbone}, batch {batch}, fp16, {torch.cuda.get_device_name()}")
    print("| mode | images/s (median) | ratio to the forward ceiling | target |")
    print("|---|---:|---:|---:|")
    for name, rate in rates.items():
        goal = ">= 0.8" if "decode" in name else ""
        print(f"| {name} | {rate:.0f} | {rate / ceiling:.2f} | {goal} |")
    return 0
