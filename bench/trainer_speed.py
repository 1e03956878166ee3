"""Trainer speed on this machine: where an epoch's time goes, and what
channels-last memory layout buys.

    .venv/bin/python -m bench.trainer_speed [--backbone efficientnet_lite0] [--batch 50]
        [--image-size 224] [--repeats 3] [--threads N] [--device cpu|cuda]

Side by side, in one run, interleaved (median of --repeats):

- one training step (forward, backward, Adam) on a batch, NCHW vs channels-last;
- one evaluation forward on the same batch, NCHW vs channels-last;
- decoding + the train / eval transforms per image, on real photos
  (clothing-small train/ when present, else scikit-image sample photos),
  to size the DataLoader: one worker keeps up when per-batch loading is a
  small fraction of a step.

Prints a table and writes bench/results/trainer_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from imagesearch.model.backbones import BACKBONES, build_model, default_device  # noqa: E402
from imagesearch.model.preprocessing import PreprocessSpec, decode_image, eval_transform, is_image_path, train_transform  # noqa: E402
from testkit import sample_photos  # noqa: E402

CLOTHING = Path(os.environ.get("IMAGESEARCH_CLOTHING_DIR", ROOT.parent / "shared" / "data" / "clothing-small"))


def photos(n: int) -> tuple[str, list[bytes]]:
    train = CLOTHING / "train"
    if train.is_dir():
        files = sorted(p for d in sorted(train.iterdir()) if d.is_dir() for p in sorted(d.iterdir())
                       if is_image_path(p))
        step = max(1, len(files) // n)
        picked = files[::step][:n]
        return f"clothing-small train/ ({len(picked)} JPEG files)", [p.read_bytes() for p in picked]
    return "scikit-image/scikit-learn sample photos (JPEG)", sample_photos(n, max_side=640)


def time_it(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="efficientnet_lite0", choices=sorted(BACKBONES))
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=100, help="photos for the loading measurement")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device(args.device)
    info = BACKBONES[args.backbone]
    spec = PreprocessSpec(args.image_size, info.preprocess.mean, info.preprocess.std, info.preprocess.interpolation)

    source, data = photos(args.images)
    tt, et = train_transform(spec, "seed"), eval_transform(spec)  # as in bench/results/training.md
    batch = torch.stack([et(decode_image(b)) for b in (data * (args.batch // len(data) + 1))[:args.batch]])
    targets = torch.arange(args.batch) % 10

    models = {}
    for layout in ("nchw", "channels_last"):
        torch.manual_seed(0)
        m = build_model(args.backbone, "imagenet", 10).to(device)
        x = batch.to(device)
        if layout == "channels_last":
            m = m.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        models[layout] = (m, torch.optim.Adam(m.parameters(), lr=1e-4), x)

    def step(layout):
        m, opt, x = models[layout]
        m.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), targets.to(device)).backward()
        opt.step()

    @torch.inference_mode()
    def forward(layout):
        m, _, x = models[layout]
        m.eval()
        m(x)

    times: dict[str, list[float]] = {}
    for layout in models:  # warm-up: first calls pick kernels and allocate
        step(layout)
        forward(layout)
    for _ in range(args.repeats):
        for layout in models:
            times.setdefault(f"train step {layout}", []).append(time_it(lambda: step(layout), device))
            times.setdefault(f"eval forward {layout}", []).append(time_it(lambda: forward(layout), device))
        for name, transform in (("load+train transform", tt), ("load+eval transform", et)):
            t0 = time.perf_counter()
            for b in data:
                transform(decode_image(b))
            times.setdefault(name, []).append((time.perf_counter() - t0) / len(data) * args.batch)

    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        ("train step, NCHW", med["train step nchw"], 1.0),
        ("train step, channels-last", med["train step channels_last"],
         med["train step channels_last"] / med["train step nchw"]),
        ("eval forward, NCHW", med["eval forward nchw"], 1.0),
        ("eval forward, channels-last", med["eval forward channels_last"],
         med["eval forward channels_last"] / med["eval forward nchw"]),
        ("decode + train transforms (1 process)", med["load+train transform"],
         med["load+train transform"] / med["train step channels_last"]),
        ("decode + eval transforms (1 process)", med["load+eval transform"],
         med["load+eval transform"] / med["eval forward channels_last"]),
    ]
    print(f"{args.backbone}, batch {args.batch}, {args.image_size} px, device {device}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores; photos: {source}; "
          f"median of {args.repeats}, interleaved")
    print(f"{'per batch of ' + str(args.batch):42s} {'seconds':>9s} {'ratio':>8s}")
    for name, secs, ratio in rows:
        print(f"{name:42s} {secs:9.3f} {ratio:8.2f}")
    print("ratios: channels-last rows vs NCHW; loading rows vs the channels-last step/forward they feed")
    out = ROOT / "bench" / "results" / "trainer_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "backbone": args.backbone, "batch": args.batch, "image_size": args.image_size, "device": str(device),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "torch": str(torch.__version__), "photos": source, "repeats": args.repeats,
        "median_seconds": med, "samples": times,
        "rows": [{"name": n, "seconds": s, "ratio": r} for n, s, r in rows]}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
