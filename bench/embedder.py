"""Embedder throughput: the gRPC service against the same model in-process.

    .venv/bin/python -m bench.embedder [--device cpu|cuda] [--batch N] [--threads T]

Side by side, in one run, on the same real photos (the clothing-small gallery
when present, else scikit-image / scikit-learn sample photos), same model,
batch size, device and torch thread count:

- in-process: `Embedder.embed_images` on consecutive chunks of --batch images:
  decode + preprocess serially, then one forward (the model's own throughput
  including decode), plus the forward alone on pre-decoded tensors (the ceiling);
- service, EmbedStream: one bidirectional stream carrying every image;
- service, Embed x C: C client threads each calling Embed in a loop.

The service is a real process (`python -m embedder_service`, port 0) started
by this script. Each mode runs --repeats times, interleaved; the median counts.
Prints a table and writes bench/results/embedder.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from imagesearch.testing import ServiceProcess, sample_photos  # noqa: E402
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc  # noqa: E402

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
    p.add_argument("--batch", type=int, default=0, help="batch size; 0 = 8 on cpu, 64 on cuda")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in the service and in-process; 0 = the CPU count on cpu, 1 on cuda")
    p.add_argument("--decode-workers", type=int, default=0, help="service decode threads; 0 = its default")
    p.add_argument("--images", type=int, default=0, help="images per run; 0 = 192 on cpu, 4096 on cuda")
    p.add_argument("--concurrency", type=int, nargs="+", default=None,
                   help="concurrent Embed callers, one row each; default: batch and 2 x batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "embedder.json")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    cuda = args.device == "cuda"
    batch = args.batch or (64 if cuda else 8)
    threads = args.threads or (1 if cuda else os.cpu_count() or 1)
    n_images = args.images or (4096 if cuda else 192)
    concurrency = args.concurrency or [batch, 2 * batch]
    torch.set_num_threads(threads)
    source, photos = real_photos()
    images = take(photos, n_images)
    warm = take(photos, 2 * batch)
    print(f"{n_images} images from {source}; {args.backbone} on {args.device}, batch {batch}, "
          f"torch threads {threads}, {os.cpu_count()} CPUs", flush=True)

    embedder = Embedder.load(backbone=args.backbone, device=args.device, max_batch=batch)
    embedder.warm_up()
    service_args = ["--backbone", args.backbone, "--device", args.device, "--max-batch", str(batch),
                    "--max-wait-ms", str(args.max_wait_ms), "--threads", str(threads)]
    if args.decode_workers:
        service_args += ["--decode-workers", str(args.decode_workers)]
    times: dict[str, list[float]] = {"in-process (decode + forward)": [], "in-process forward only": [],
                                     "service EmbedStream": []}
    for c in concurrency:
        times[f"service Embed x {c}"] = []
    with ServiceProcess("embedder_service", *service_args, env={"IMAGESEARCH_TORCH_THREADS": str(threads)},
                        startup_timeout=600) as service, service.channel() as channel:
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
        info = stub.GetModelInfo(embedder_pb2.GetModelInfoRequest())
        if info.fingerprint != embedder.info.fingerprint:
            raise SystemExit("the service serves another model than the in-process one")
        run_stream(stub, warm)
        run_unary(stub, warm, concurrency[0])
        run_in_process(embedder, warm, batch)
        for r in range(args.repeats):
            times["in-process (decode + forward)"].append(run_in_process(embedder, images, batch))
            times["in-process forward only"].append(run_forward_only(embedder, images, batch))
            times["service EmbedStream"].append(run_stream(stub, images))
            for c in concurrency:
                times[f"service Embed x {c}"].append(run_unary(stub, images, c))
            print(f"  round {r + 1}/{args.repeats} done", flush=True)
        server_device = info.device

    baseline = times["in-process (decode + forward)"]
    base = n_images / statistics.median(baseline)
    rows = []
    for mode, ts in times.items():
        rate = n_images / statistics.median(ts)
        # Paired: each round runs every mode back to back, so a ratio within a
        # round cancels the load other jobs put on the machine at that moment.
        paired = statistics.median(b / t for b, t in zip(baseline, ts))
        rows.append({"mode": mode, "images": n_images, "median_s": statistics.median(ts), "runs_s": ts,
                     "images_per_s": rate, "ratio_to_in_process": rate / base,
                     "median_ratio_per_round": paired})
    target = 0.8 if cuda else 0.85  # service / in-process (decode + forward)
    load = os.getloadavg()
    print()
    print("| mode | images/s (median) | ratio to in-process | ratio, median per round | target |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        goal = f">= {target}" if row["mode"].startswith("service") else ""
        print(f"| {row['mode']} | {row['images_per_s']:.1f} | {row['ratio_to_in_process']:.2f} "
              f"| {row['median_ratio_per_round']:.2f} | {goal} |")
    print(f"\nload average at the end (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    result = {
        "benchmark": "embedder", "source": source, "backbone": args.backbone, "device": args.device,
        "server_device": server_device, "batch": batch, "torch_threads": threads,
        "decode_workers": args.decode_workers or "default", "max_wait_ms": args.max_wait_ms,
        "images_per_run": n_images, "repeats": args.repeats, "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if cuda else None, "target_ratio": target,
        "load_average_at_end": load, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
