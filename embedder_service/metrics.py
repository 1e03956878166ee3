"""The embedder's own Prometheus metrics, on top of the per-RPC ones
(imagesearch.serving.metrics), each by served model (`model`: its name, "default" for
one model served with the single-model flags):

    imagesearch_embedder_batch_size_images{model}          images per model batch (histogram)
    imagesearch_embedder_queue_depth_images{model}         images accepted and not yet through the model
    imagesearch_embedder_decode_seconds{model}             decode + preprocess of one image (histogram)
    imagesearch_embedder_inference_seconds{model}          one model batch (histogram)
    imagesearch_embedder_images_refused_total{model,reason}  too_many_bytes, too_many_pixels, undecodable

They are taken by wrapping the two functions the batcher runs (decode one
image, run one batch), so neither the batcher nor the model knows of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from imagesearch import errors
from imagesearch.serving.metrics import ServiceMetrics

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DECODE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
REASONS = ("too_many_bytes", "too_many_pixels", "undecodable")


def refusal_reason(exc: BaseException, size: int, max_bytes: int) -> str | None:
    if isinstance(exc, errors.ResourceExhausted):
        return "too_many_bytes" if size > max_bytes else "too_many_pixels"
    if isinstance(exc, errors.InvalidArgument):
        return "undecodable"
    return None


class EmbedderMetrics:
    def __init__(self, metrics: ServiceMetrics):
        self.batch_size = metrics.histogram("batch_size_images", "Images per model batch", ["model"],
                                            buckets=BATCH_BUCKETS)
        self.queue_depth = metrics.gauge("queue_depth_images",
                                         "Images accepted and not yet through the model (decoding or queued)",
                                         ["model"])
        self.decode = metrics.histogram("decode_seconds", "Decoding and preprocessing one image", ["model"],
                                        buckets=DECODE_BUCKETS)
        self.inference = metrics.histogram("inference_seconds", "Running the model on one batch", ["model"])
        self.refused = metrics.counter("images_refused", "Images refused before the model, by reason",
                                       ["model", "reason"])

    def timed_decode(self, decode: Callable, max_bytes: int, model: str) -> Callable:
        """`decode(data, name)` of `model` that observes its time and counts refusals."""
        refused = {reason: self.refused.labels(model, reason) for reason in REASONS}  # each series from the start
        seconds = self.decode.labels(model)

        def run(data: bytes, name: str = ""):
            started = time.perf_counter()
            try:
                return decode(data, name)
            except errors.ImageSearchError as exc:
                reason = refusal_reason(exc, len(data), max_bytes)
                if reason:
                    refused[reason].inc()
                raise
            finally:
                seconds.observe(time.perf_counter() - started)
        return run

    def timed_batch(self, run_batch: Callable[[Sequence], Sequence], model: str) -> Callable[[Sequence], Sequence]:
        """`run_batch(tensors)` of `model` that observes the batch size and the model's time."""
        batch_size, inference = self.batch_size.labels(model), self.inference.labels(model)

        def run(tensors):
            tensors = list(tensors)
            batch_size.observe(len(tensors))
            with inference.time():
                return run_batch(tensors)
        return run

    def watch_queue(self, batcher, model: str) -> None:
        def depth() -> int:
            s = batcher.stats
            return s.submitted - s.items - s.dropped - s.prepare_failed
        self.queue_depth.labels(model).set_function(depth)
