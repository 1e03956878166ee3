"""Embedder throughput per inference engine: the gRPC service against the same
model in-process, on ordinary photos and on 12-megapixel JPEGs.

    .venv/bin/python -m bench.embedder [--engines torch onnxruntime] [--photos both]
                                       [--device cpu|cuda] [--batch N] [--threads T]
                                       [--checkpoints A.pt B.pt ...]

Side by side, in one run, for each photo set and each (engine, decode) setting,
same model, batch size, device and torch thread count:

- in-process: `Embedder.embed_images` on consecutive chunks of --batch images:
  decode + preprocess serially, then one forward (the model's own throughput
  including decode), plus the forward alone on pre-decoded tensors (the ceiling);
- service, EmbedStream: one bidirectional stream carrying every image;
- service, Embed x C: C client threads each calling Embed in a loop.

`--checkpoints` serves trainer checkpoints (e.g. one plain and its fused
copies) instead of --backbone's ImageNet model: every setting once per checkpoint,
the first checkpoint's the baseline.

Photo sets: `clothing` = the clothing-small gallery (about 256 px; else
scikit-image / scikit-learn sample photos); `12mp` = the same photos upscaled
to 4000x3000 and saved as JPEG q90, where the settings include today's
baseline (torch, full decode). Each service is a real process
(`python -m embedder_service`, port 0). Every mode runs --repeats times,
interleaved; the median counts, and ratios are also taken within each round
(the machine is shared). With --device cuda: torch fp16 in-process with GPU
JPEG decode (bench/embedder_gpu.py) against the forward ceiling.
Prints a table and writes bench/results/embedder.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from clients.cli.demo import find_photos  # noqa: E402
from embedder_service.embedder import Embedder  # noqa: E402
from imagesearch.model.preprocessing import is_image_path  # noqa: E402
from testkit import ServiceProcess, sample_photos  # noqa: E402
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc  # noqa: E402

LOADS: list[float] = []  # 1-minute load average after each round (the machine is shared)
CLOTHING = Path(os.environ.get("IMAGESEARCH_CLOTHING_DIR", ROOT.parent / "shared" / "data" / "clothing-small"))


def real_photos() -> tuple[str, list[bytes]]:
    """Encoded real photos: the clothing-small gallery, else library sample photos as JPEG."""
    gallery = CLOTHING / "retrieval" / "gallery"
    if gallery.is_dir():
        files = sorted(p for p in gallery.iterdir() if is_image_path(p))
        if files:
            return f"clothing-small gallery ({len(files)} JPEG files)", [p.read_bytes() for p in files]
    photos = sample_photos(len(find_photos()), max_side=640)
    return f"scikit-image/scikit-learn sample photos ({len(photos)} JPEG files)", photos


def take(photos: list[bytes], n: int) -> list[bytes]:
    return [photos[i % len(photos)] for i in range(n)]


def upscale_12mp(photos: list[bytes], n: int, size=(4000, 3000), quality: int = 90) -> list[bytes]:
    """The first `n` photos upscaled to 4000x3000 (bicubic) and saved as JPEG q90:
    what a phone gallery sends."""
    from PIL import Image

    out = []
    for data in photos[:n]:
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(
            buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


# ---------------------------------------------------------------- the modes


def on_a_thread(fn, *args) -> float:
    """Run `fn` on a fresh thread, as the service runs its model on its own
    thread (on a busy machine torch's OpenMP pool is slower on the main thread:
    measuring there would flatter the service)."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args)))
    t.start()
    t.join()
    if not out:
        raise RuntimeError(f"{fn.__name__} failed")
    return out[0]


def run_in_process(embedder: Embedder, images: list[bytes], batch: int) -> float:
    def work():
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            embedder.embed_images(images[i:i + batch])
        _sync(embedder)
        return time.perf_counter() - start
    return on_a_thread(work)


def run_forward_only(embedder: Embedder, images: list[bytes], batch: int) -> float:
    tensors = [embedder.decode(data) for data in images[:batch]]
    rounds = max(1, len(images) // batch)

    def work():
        start = time.perf_counter()
        for _ in range(rounds):
            embedder.embed_tensors(tensors)
        _sync(embedder)
        return (time.perf_counter() - start) * len(images) / (rounds * batch)
    return on_a_thread(work)


def _sync(embedder: Embedder) -> None:
    if embedder.device.type == "cuda":
        torch.cuda.synchronize(embedder.device)


def run_stream(stub, images: list[bytes]) -> float:
    start = time.perf_counter()
    requests = (embedder_pb2.EmbedStreamRequest(id=str(i), image=data) for i, data in enumerate(images))
    n = 0
    for response in stub.EmbedStream(requests, timeout=3600):
        if response.WhichOneof("result") != "embedding":
            raise RuntimeError(f"item {response.id}: {response.error.message}")
        n += 1
    elapsed = time.perf_counter() - start
    if n != len(images):
        raise RuntimeError(f"stream returned {n} of {len(images)} items")
    return elapsed


def run_unary(stub, images: list[bytes], concurrency: int) -> float:
    failures: list[BaseException] = []

    def worker(k: int):
        try:
            for data in images[k::concurrency]:
                stub.Embed(embedder_pb2.EmbedRequest(image=data, name="bench"), timeout=600)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"Embed failed: {failures[0]}")
    return elapsed


# ---------------------------------------------------------------- main


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--engines", nargs="+", default=["torch", "onnxruntime"],  # first = clothing baseline
                   choices=("torch", "onnxruntime"), help="engines to compare (cpu)")
    p.add_argument("--photos", choices=("clothing", "12mp", "both"), default="both")
    p.add_argument("--batch", type=int, default=0, help="batch size; 0 = 8 on cpu, 64 on cuda")
    p.add_argument("--threads", type=int, default=0,
                   help="torch and engine threads in-process, and (when given) the service's --threads and "
                        "--engine-threads; 0 = the CPU count on cpu, 1 on cuda in-process, the service's own "
                        "thread plan (embedder_service.threads) in the service")
    p.add_argument("--decode-workers", type=int, default=0, help="service decode threads; 0 = its default")
    p.add_argument("--service-args", default="",
                   help="more flags for every service, e.g. '--decode-workers 3 --stream-window 8'")
    p.add_argument("--images", type=int, default=0, help="clothing images per run; 0 = 192 on cpu, 4096 on cuda")
    p.add_argument("--images-12mp", type=int, default=32, help="12-megapixel images per run")
    p.add_argument("--concurrency", type=int, nargs="*", default=None,
                   help="concurrent Embed callers, one row each; default: the batch size")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engine-cache", default=None, help="the services' and in-process --engine-cache")
    p.add_argument("--checkpoints", nargs="+", type=Path, default=[],
                   help="trainer checkpoints to serve, each crossed with the settings (default: --backbone)")
    p.add_argument("--int8-calibration", type=Path, default=None,
                   help="also run onnxruntime int8 calibrated on this folder (setting onnxruntime-int8)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "embedder.json")
    return p


def settings_for(photo_set: str, engines: list[str]) -> list[tuple[str, str]]:
    """(engine, decode) pairs; the first is the baseline ratios are taken to."""
    if photo_set == "12mp":
        return [("torch", "full")] + [(e, "draft") for e in engines]
    return [(e, "draft") for e in engines]


def bench_set(args, label: str, images: list[bytes], batch: int, threads: int, concurrency: list[int]) -> list[dict]:
    """Every (engine, decode) setting on one photo set, rounds interleaved."""
    settings = settings_for(label, args.engines)
    if args.int8_calibration:
        settings.append(("onnxruntime-int8", "draft"))
    settings = [(setting, decode, model) for model in args.checkpoints or [None] for setting, decode in settings]
    warm = images[:2 * batch]
    cache = ["--engine-cache", args.engine_cache] if args.engine_cache else []
    embedders, services, stubs, times = {}, {}, {}, {}
    for key in settings:
        setting, decode, checkpoint = key
        engine = setting.removesuffix("-int8")  # "onnxruntime-int8": onnxruntime with --int8-calibration
        int8 = ["--int8-calibration", str(args.int8_calibration)] if setting.endswith("-int8") else []
        model = {"checkpoint": str(checkpoint)} if checkpoint else {"backbone": args.backbone}
        embedders[key] = Embedder.load(**model, device=args.device, engine=engine, decode=decode,
                                       cache_dir=args.engine_cache, max_batch=batch, engine_threads=threads,
                                       int8_calibration=args.int8_calibration if int8 else None)
        embedders[key].warm_up()
        service_args = [*(x for k, v in model.items() for x in (f"--{k}", v)), "--device", args.device,
                        "--max-batch", str(batch), "--max-wait-ms", str(args.max_wait_ms), "--engine", engine,
                        "--decode", decode, *cache, *int8, *shlex.split(args.service_args)]
        if args.threads:
            service_args += ["--threads", str(threads), "--engine-threads", str(threads)]
        if args.decode_workers:
            service_args += ["--decode-workers", str(args.decode_workers)]
        # No IMAGESEARCH_TORCH_THREADS (ServiceProcess sets 1 for tests): the service's own thread plan.
        services[key] = ServiceProcess("embedder_service", *service_args, startup_timeout=600,
                                       env={"IMAGESEARCH_TORCH_THREADS": ""})
        channel = services[key].channel()
        stubs[key] = embedder_pb2_grpc.EmbedderServiceStub(channel)
        info = stubs[key].GetModelInfo(embedder_pb2.GetModelInfoRequest())
        if info.fingerprint != embedders[key].info.fingerprint or info.engine != engine:
            raise SystemExit(f"the {engine} service serves another model than the in-process one")
        modes = ["in-process (decode + forward)", "in-process forward only", "service EmbedStream"]
        modes += [f"service Embed x {c}" for c in concurrency]
        times[key] = {m: [] for m in modes}
        run_stream(stubs[key], warm)
        run_in_process(embedders[key], warm, batch)
    try:
        for r in range(args.repeats):
            for key in settings:
                t = times[key]
                t["in-process (decode + forward)"].append(run_in_process(embedders[key], images, batch))
                t["in-process forward only"].append(run_forward_only(embedders[key], images, batch))
                t["service EmbedStream"].append(run_stream(stubs[key], images))
                for c in concurrency:
                    t[f"service Embed x {c}"].append(run_unary(stubs[key], images, c))
            LOADS.append(os.getloadavg()[0])
            print(f"  {label}: round {r + 1}/{args.repeats} done, load average (1 min) {LOADS[-1]:.2f}", flush=True)
    finally:
        for proc in services.values():
            proc.terminate()
    base_key = settings[0]
    rows = []
    n = len(images)
    for key in settings:
        for mode, ts in times[key].items():
            base = times[base_key][mode]
            base_in_process = times[key]["in-process (decode + forward)"]
            rows.append({
                "photos": label, "engine": key[0], "decode": key[1], "mode": mode, "images": n,
                "model": key[2].name if key[2] else args.backbone, "dim": embedders[key].info.dim,
                "median_s": statistics.median(ts), "runs_s": ts, "images_per_s": n / statistics.median(ts),
                # Paired: each round runs every setting and mode back to back, so a ratio
                # within a round cancels the load other jobs put on the machine then.
                "ratio_to_baseline": statistics.median(b / t for b, t in zip(base, ts)),
                "ratio_to_in_process": statistics.median(b / t for b, t in zip(base_in_process, ts)),
            })
    return rows


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    cuda = args.device == "cuda"
    batch = args.batch or (64 if cuda else 8)
    threads = args.threads or (1 if cuda else os.cpu_count() or 1)
    n_images = args.images or (4096 if cuda else 192)
    concurrency = args.concurrency if args.concurrency is not None else [batch]
    torch.set_num_threads(threads)
    if cuda:
        from bench.embedder_gpu import main as gpu_main

        return gpu_main(args, batch, n_images)
    source, photos = real_photos()
    sets = []
    if args.photos in ("clothing", "both"):
        sets.append(("clothing", take(photos, n_images)))
    if args.photos in ("12mp", "both"):
        big = upscale_12mp(photos, min(len(photos), args.images_12mp))
        sets.append(("12mp", take(big, args.images_12mp)))
    print(f"photos from {source}; {args.backbone} on {args.device}, batch {batch}, torch threads {threads}, "
          f"{os.cpu_count()} CPUs; engines {', '.join(args.engines)}", flush=True)
    rows = []
    for label, images in sets:
        rows += bench_set(args, label, images, batch, threads, concurrency)
    load = os.getloadavg()
    print()
    print("| model | dim | photos | engine | decode | mode | images/s (median) | ratio to baseline "
          "| ratio to own in-process |")
    print("|---|---:|---|---|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['model']} | {row['dim']} | {row['photos']} | {row['engine']} | {row['decode']} | {row['mode']} "
              f"| {row['images_per_s']:.1f} "
              f"| {row['ratio_to_baseline']:.2f} | {row['ratio_to_in_process']:.2f} |")
    print("\nbaseline: the first setting of each photo set, same mode (torch draft on clothing, where draft "
          "changes nothing at 256 px; torch full decode on 12mp: today's service)")
    print(f"load average at the end (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"1 min after each round: {min(LOADS):.1f}-{max(LOADS):.1f} (median {statistics.median(LOADS):.1f})")
    result = {
        "benchmark": "embedder", "source": source, "backbone": args.backbone, "device": args.device,
        "batch": batch, "torch_threads": threads, "decode_workers": args.decode_workers or "default",
        "max_wait_ms": args.max_wait_ms, "repeats": args.repeats, "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(), "load_average_at_end": load,
        "load_1min_per_round": LOADS, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
