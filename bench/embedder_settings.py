"""EmbedStream throughput of one embedder service under several flag sets, interleaved.

    .venv/bin/python -m bench.embedder_settings --photos clothing \
        --setting "torch=--engine torch" \
        --setting "ort-before=--engine onnxruntime --threads 2 --stream-window 8" \
        --setting "ort=--engine onnxruntime"

Each setting is a real service process (`python -m embedder_service`, port 0,
efficientnet_lite0, no IMAGESEARCH_TORCH_THREADS: its own thread plan unless
the flags say otherwise); every round streams the same images through each
setting in turn (one `EmbedStream`), and the ratio to the first setting is
taken within each round, then the median (the machine is shared). Photos as in
bench.embedder: the clothing-small gallery, or those photos upscaled to 12
megapixels (`--photos 12mp`). Prints a table with the 1-minute load average.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.embedder import real_photos, run_stream, take, upscale_12mp  # noqa: E402
from testkit import ServiceProcess  # noqa: E402
from imagesearch.v1 import embedder_pb2_grpc  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", action="append", required=True, metavar="LABEL=FLAGS",
                   help="a label and the service's flags; the first is the baseline")
    p.add_argument("--photos", choices=("clothing", "12mp"), default="clothing")
    p.add_argument("--images", type=int, default=0, help="images per stream; 0 = 96 clothing, 24 12mp")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    settings = dict(s.split("=", 1) for s in args.setting)
    source, photos = real_photos()
    n = args.images or (96 if args.photos == "clothing" else 24)
    images = take(photos, n) if args.photos == "clothing" else take(upscale_12mp(photos, min(len(photos), n)), n)
    print(f"{n} {args.photos} photos from {source}; {os.cpu_count()} CPUs", flush=True)
    services, stubs = {}, {}
    try:
        for label, flags in settings.items():
            services[label] = ServiceProcess("embedder_service", "--backbone", "efficientnet_lite0",
                                             *shlex.split(flags), env={"IMAGESEARCH_TORCH_THREADS": ""},
                                             startup_timeout=600)
            stubs[label] = embedder_pb2_grpc.EmbedderServiceStub(services[label].channel())
            run_stream(stubs[label], images[:16])  # warm
        rates: dict[str, list[float]] = {label: [] for label in settings}
        loads = []
        for r in range(args.repeats):
            for label in settings:
                rates[label].append(n / run_stream(stubs[label], images))
            loads.append(os.getloadavg()[0])
            print(f"  round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items())
                  + f" img/s; load average (1 min) {loads[-1]:.1f}", flush=True)
    finally:
        for proc in services.values():
            proc.terminate()
    base = rates[next(iter(settings))]
    print("\n| setting | service flags | EmbedStream images/s (median) | ratio to first, median per round |")
    print("|---|---|---:|---:|")
    for label, flags in settings.items():
        ratio = statistics.median(v / b for v, b in zip(rates[label], base))
        print(f"| {label} | `{flags}` | {statistics.median(rates[label]):.1f} | {ratio:.2f} |")
    print(f"\nload average (1 min) after each round: {min(loads):.1f}-{max(loads):.1f} "
          f"(median {statistics.median(loads):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
