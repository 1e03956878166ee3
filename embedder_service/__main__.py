"""`python -m embedder_service` / `imagesearch-embedder`: serve EmbedderService.

Start-up order: bind and start the server (health NOT_SERVING, RPCs answer
UNAVAILABLE), load every model (`--model NAME=SPEC`, repeated; else the
single-model flags, one model named "default"), warm them up, then mark health
SERVING. SIGTERM / SIGINT: health NOT_SERVING, drain in-flight calls for
--grace seconds, then stop the batchers' threads. A model that cannot be
loaded (weights missing, bad checkpoint, no GPU) ends the process with a
one-line error, exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

from imagesearch import extras

# Before anything imports what the [embedder] extra brings: a base install gets one line, exit 2.
extras.exit_if_missing("embedder", prog="imagesearch-embedder")

from embedder_service.metrics import EmbedderMetrics
from embedder_service.servicer import SERVICE_NAME, EmbedderServicer, Limits, register
from embedder_service.threads import Turns, plan_threads
from imagesearch import defaults, errors, serving
from imagesearch.serving.metrics import add_metrics_arguments
from imagesearch.serving.observe import Observability

log = logging.getLogger("embedder_service")

ENV = defaults.EMBEDDER_ENV
# Room for the other fields and protobuf framing around the largest image.
MESSAGE_OVERHEAD_BYTES = 64 * 1024
MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SINGLE_MODEL_FLAGS = ("checkpoint", "backbone", "weights")


def _env(name: str, default):
    return serving.env_default(f"{ENV}_{name}", default)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imagesearch-embedder",
        description="gRPC EmbedderService: encoded images in, L2-normalised float32 vectors out.")
    serving.add_server_arguments(p, env_prefix=ENV, default_port=defaults.EMBEDDER_PORT)
    m = p.add_argument_group("model")
    m.add_argument("--model", action="append", default=[], metavar="NAME=SPEC",
                   help="serve several models, one --model each: SPEC is a trainer checkpoint or "
                        "BACKBONE[:WEIGHTS] (WEIGHTS: imagenet | none | FILE); the first is the default. "
                        "Replaces --checkpoint/--backbone/--weights (those serve one model, named default); "
                        "the other model flags apply to every model (docs/embedder.md#several-models-in-one-embedder)")
    m.add_argument("--checkpoint", default=_env("CHECKPOINT", None),
                   help=f"trainer checkpoint to serve; backbone and preprocessing come from its meta "
                        f"(env {ENV}_CHECKPOINT)")
    m.add_argument("--backbone", choices=defaults.BACKBONES, default=_env("BACKBONE", None),
                   help=f"backbone without --checkpoint (env {ENV}_BACKBONE; default {defaults.DEFAULT_BACKBONE})")
    m.add_argument("--weights", default=_env("WEIGHTS", None),
                   help=f"imagenet | none | FILE (state_dict), without --checkpoint "
                        f"(env {ENV}_WEIGHTS; default imagenet)")
    m.add_argument("--device", choices=("auto", "cpu", "cuda"), default=_env("DEVICE", "auto"),
                   help=f"auto = cuda when there is one (env {ENV}_DEVICE; default %(default)s)")
    m.add_argument("--tta", choices=("none", "flip"), default=_env("TTA", "none"),
                   help=f"test-time augmentation: flip = average the vectors of the image and its mirror image, "
                        f"renormalised (about 2x the compute; other vectors, so another fingerprint) "
                        f"(env {ENV}_TTA; default %(default)s)")
    m.add_argument("--engine", choices=defaults.ENGINES, default=_env("ENGINE", "auto"),
                   help=f"inference engine; auto = onnxruntime on CPU, torch (fp16) on CUDA; onnxruntime "
                        f"exports the model to ONNX once, cached by fingerprint (env {ENV}_ENGINE; "
                        f"default %(default)s)")
    m.add_argument("--decode", choices=defaults.DECODE_MODES, default=_env("DECODE", None),
                   help=f"JPEG decode: draft = at the smallest DCT scale that covers the input size, full = every "
                        f"pixel (the baseline the benchmarks measure draft against); default: the model's own "
                        f"mode, draft for ImageNet weights and trainer checkpoints. Enters the fingerprint "
                        f"(env {ENV}_DECODE)")
    m.add_argument("--engine-cache", default=_env("ENGINE_CACHE", None),
                   help=f"folder for exported ONNX models (env {ENV}_ENGINE_CACHE; default "
                        f"$XDG_CACHE_HOME/imagesearch or ~/.cache/imagesearch)")
    m.add_argument("--int8-calibration", default=_env("INT8_CALIBRATION", None), metavar="FOLDER",
                   help=f"serve an int8 model (onnxruntime, static quantisation) calibrated on the images "
                        f"in FOLDER; its vectors differ from fp32, so it has its own fingerprint "
                        f"(env {ENV}_INT8_CALIBRATION)")
    t = p.add_argument_group("threads (0 / auto = embedder_service.threads.plan_threads, from the core count: "
                             "docs/embedder.md#threads)")
    t.add_argument("--threads", type=int, default=_env("THREADS", 0),
                   help=f"torch intra-op threads; 0 = {defaults.TORCH_THREADS_ENV} if set, else the core count "
                        f"with --engine torch on CPU, 1 otherwise (env {ENV}_THREADS)")
    t.add_argument("--engine-threads", type=int, default=_env("ENGINE_THREADS", 0),
                   help=f"ONNX Runtime intra-op threads; 0 = the core count (env {ENV}_ENGINE_THREADS)")
    t.add_argument("--decode-workers", type=int, default=_env("DECODE_WORKERS", 0),
                   help=f"threads that decode and preprocess; 0 = the core count on CPU, min(8, cores) on CUDA "
                        f"(env {ENV}_DECODE_WORKERS)")
    b = p.add_argument_group("batching and limits")
    b.add_argument("--max-batch", type=int, default=_env("MAX_BATCH", 0),
                   help=f"largest batch the model runs; 0 = {defaults.CPU_MAX_BATCH} on CPU, "
                        f"{defaults.CUDA_MAX_BATCH} on CUDA (env {ENV}_MAX_BATCH)")
    b.add_argument("--max-wait-ms", type=float, default=_env("MAX_WAIT_MS", 5.0),
                   help=f"longest a batch waits to fill after its first item (env {ENV}_MAX_WAIT_MS; "
                        f"default %(default)s)")
    b.add_argument("--stream-window", type=int, default=_env("STREAM_WINDOW", 0),
                   help=f"items one EmbedStream may have in flight before the server stops reading it; "
                        f"0 = {defaults.CPU_STREAM_WINDOW_BATCHES} x max batch with an ONNX engine on CPU, "
                        f"1 x with torch on CPU, 2 x on CUDA (env {ENV}_STREAM_WINDOW)")
    b.add_argument("--max-streams", type=int, default=_env("MAX_STREAMS", defaults.MAX_EMBED_STREAMS),
                   help=f"EmbedStream calls open at once; more get RESOURCE_EXHAUSTED at once. gRPC takes in each "
                        f"stream's first image whether or not it is read, so this bounds their memory "
                        f"(about this x (image size + 200 KB)); 0 = no cap (env {ENV}_MAX_STREAMS; "
                        f"default %(default)s)")
    b.add_argument("--max-image-bytes", type=int, default=_env("MAX_IMAGE_BYTES", defaults.MAX_IMAGE_BYTES),
                   help=f"largest encoded image (env {ENV}_MAX_IMAGE_BYTES; default %(default)s); "
                        f"the gRPC message limit is this plus {MESSAGE_OVERHEAD_BYTES}")
    b.add_argument("--max-inflight-image-bytes", type=int,
                   default=_env("MAX_INFLIGHT_IMAGE_BYTES", defaults.MAX_INFLIGHT_IMAGE_BYTES),
                   help=f"encoded image bytes held at once across every call (read, not yet embedded); past it "
                        f"calls wait before reading more (env {ENV}_MAX_INFLIGHT_IMAGE_BYTES; default %(default)s)")
    b.add_argument("--max-image-pixels", type=int, default=_env("MAX_IMAGE_PIXELS", defaults.MAX_IMAGE_PIXELS),
                   help=f"largest decoded width x height (env {ENV}_MAX_IMAGE_PIXELS; default %(default)s)")
    serving.add_logging_arguments(p)
    add_metrics_arguments(p, env_prefix=ENV)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    for flag, value, least in [("--max-batch", args.max_batch, 0), ("--max-wait-ms", args.max_wait_ms, 0),
                               ("--max-image-bytes", args.max_image_bytes, 1),
                               ("--max-image-pixels", args.max_image_pixels, 1),
                               ("--max-inflight-image-bytes", args.max_inflight_image_bytes, 1),
                               ("--threads", args.threads, 0), ("--decode-workers", args.decode_workers, 0),
                               ("--engine-threads", args.engine_threads, 0),
                               ("--stream-window", args.stream_window, 0), ("--max-streams", args.max_streams, 0)]:
        if value < least:
            parser.error(f"{flag} must be at least {least}, not {value}")
    for action in parser._actions:  # a default from the environment skips argparse's check of choices
        value, env = getattr(args, action.dest, None), f"{ENV}_{action.dest.upper()}"
        if action.choices and value is not None and value not in action.choices:
            source = f" (from {env})" if os.environ.get(env) == value else ""
            parser.error(f"{action.option_strings[0]} {value!r}{source}: choose one of {', '.join(action.choices)}")
    args.models = _models(parser, args)
    if args.checkpoint and args.weights:
        parser.error("--checkpoint and --weights exclude each other: a checkpoint holds its own weights")
    # Fail before binding a port, and before the seconds it takes to import torch.
    if args.checkpoint and not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    if args.int8_calibration and not Path(args.int8_calibration).is_dir():
        parser.error(f"--int8-calibration {args.int8_calibration}: no such folder")
    if args.weights not in (None, "imagenet", "none") and not Path(args.weights).is_file():
        parser.error(f"--weights {args.weights}: no such file; use imagenet, none or a path to a weights file")
    return args


def _models(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, dict]:
    """{name: Embedder.load's checkpoint / backbone / weights}, the default first."""
    if not args.model:
        return {"default": {flag: getattr(args, flag) for flag in SINGLE_MODEL_FLAGS}}
    single = [f"--{flag}" + (f" (from {ENV}_{flag.upper()})" if os.environ.get(f"{ENV}_{flag.upper()}") else "")
              for flag in SINGLE_MODEL_FLAGS if getattr(args, flag)]
    if single:
        parser.error(f"--model and {', '.join(single)} exclude each other: each --model names its own checkpoint "
                     f"or backbone, and without --model those flags serve one model")
    models: dict[str, dict] = {}
    for text in args.model:
        name, _, spec = text.partition("=")
        backbone, _, weights = spec.partition(":")
        if not spec:
            parser.error(f"--model {text!r}: write NAME=CHECKPOINT or NAME=BACKBONE[:WEIGHTS], "
                         f"e.g. --model new=runs/clothing/best.pt")
        if not MODEL_NAME.fullmatch(name):
            parser.error(f"--model {text!r}: a model name is 1 to 64 letters, digits, '_', '.' or '-'")
        if name in models:
            parser.error(f"--model {name} is given twice: each model needs a name of its own")
        if backbone in defaults.BACKBONES:
            if weights not in ("", "imagenet", "none") and not Path(weights).is_file():
                parser.error(f"--model {text}: weights {weights}: no such file; use imagenet, none or a weights file")
            models[name] = {"backbone": backbone, "weights": weights or None}
        elif Path(spec).is_file():
            models[name] = {"checkpoint": spec}
        else:
            parser.error(f"--model {text}: {spec} is neither a backbone ({', '.join(defaults.BACKBONES)}) "
                         f"nor a checkpoint file")
    return models


def main(argv=None) -> int:
    return serving.run_main(_main, argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    # The event loop thread shares the GIL with the decode and model threads:
    # a shorter switch interval lets it accept and answer calls promptly.
    sys.setswitchinterval(0.001)
    serving.configure_logging(args.log_level, args.log_format)
    max_message_bytes = args.max_image_bytes + MESSAGE_OVERHEAD_BYTES
    servicer = EmbedderServicer()
    config = serving.ServerConfig.from_args(args, max_message_bytes=max_message_bytes)
    observed = Observability("embedder", args.metrics_port)
    running = serving.build_server(config, register(servicer), [SERVICE_NAME], observed.interceptors)
    try:
        observed.start(args.host)
        batchers = _load(args, servicer, max_message_bytes, observed.metrics)
    except errors.ImageSearchError as exc:
        running.stop(0).wait()
        log.error("cannot serve: %s", exc)
        return 2
    except BaseException:
        running.stop(0).wait()
        raise
    running.set_serving(True)
    log.info("serving %s: models %s", SERVICE_NAME, ", ".join(args.models))

    def on_stop():
        servicer.ready.detach()
        # The calls are over (answered, or cancelled at the end of the grace period), so what
        # is left is dropped at once; a model call that hangs cannot hold the stop past this.
        deadline = time.monotonic() + config.grace_s
        for batcher in batchers:
            batcher.close(timeout=max(0.0, deadline - time.monotonic()))
        observed.close()
    serving.serve_until_signalled(running, on_stop=on_stop)
    return 0


def _load(args, servicer, max_message_bytes: int, metrics=None) -> list:
    """Import torch, load and warm up every model, attach them to the servicer; their batchers."""
    import torch  # noqa: F401  (heavy: only after the port is bound and health answers)
    from PIL import Image

    from embedder_service.batcher import Batcher
    from embedder_service.embedder import Embedder, resolve_engine

    device, engine = resolve_engine(args.engine, args.device)
    # One plan for every model: the engines take turns (Turns), so it is not multiplied by them.
    plan = plan_threads(engine, device.type, args.max_batch,
                        torch_threads=args.threads or int(os.environ.get(defaults.TORCH_THREADS_ENV) or 0),
                        engine_threads=args.engine_threads, decode_workers=args.decode_workers,
                        stream_window=args.stream_window)
    torch.set_num_threads(plan.torch_threads)
    # decode_image checks --max-image-pixels against the header before any pixel
    # is decoded; PIL's own process-wide guard would only speak first, in its words.
    Image.MAX_IMAGE_PIXELS = None
    embedders = {}
    for name, model in args.models.items():
        try:
            embedders[name] = Embedder.load(
                **model, device=device, engine=args.engine, cache_dir=args.engine_cache,
                int8_calibration=args.int8_calibration, decode=args.decode, max_image_bytes=args.max_image_bytes,
                max_image_pixels=args.max_image_pixels, max_batch=plan.max_batch, tta=args.tta,
                engine_threads=plan.engine_threads)
        except errors.ImageSearchError as exc:
            if not args.model:
                raise
            raise type(exc)(f"--model {name}: {exc}") from exc
        embedders[name].warm_up()
    measured = EmbedderMetrics(metrics) if metrics is not None else None
    turns = Turns()
    served = {}
    for name, embedder in embedders.items():
        decode, run_batch = embedder.decode, embedder.embed_tensors
        if measured is not None:
            decode, run_batch = (measured.timed_decode(decode, args.max_image_bytes, name),
                                 measured.timed_batch(run_batch, name))
        batcher = Batcher(lambda item, decode=decode: decode(*item), turns.taking(run_batch),
                          max_batch=plan.max_batch, max_wait_s=args.max_wait_ms / 1000.0,
                          prepare_workers=plan.decode_workers, name=f"{name} batcher")
        if measured is not None:
            measured.watch_queue(batcher, name)
        served[name] = (embedder, batcher)
    limits = Limits(max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                    max_batch=plan.max_batch, max_message_bytes=max_message_bytes,
                    max_inflight_image_bytes=args.max_inflight_image_bytes,
                    stream_window=plan.stream_window, max_streams=args.max_streams)
    servicer.attach(served, limits)
    log.info("threads: %s; max wait %.1f ms", plan.describe(), args.max_wait_ms)
    return [batcher for _, batcher in served.values()]


if __name__ == "__main__":
    sys.exit(main())
