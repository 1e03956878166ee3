"""The gRPC face of the embedder: validate, convert, call the core, convert back.

Domain errors raised here or by the core become status codes in the shared
`imagesearch.serving.ErrorMappingInterceptor`; per-item errors inside
`EmbedStream` become `EmbedStreamResponse.error` and the stream goes on.
Imports no torch: the model arrives through `attach` once it is loaded, and
until then every RPC answers UNAVAILABLE.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent import futures
from typing import Callable

import grpc

from imagesearch import errors, serving
from imagesearch.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = embedder_pb2.DESCRIPTOR.services_by_name["EmbedderService"].full_name


@dataclasses.dataclass(frozen=True)
class Limits:
    """The server's advertised limits (GetModelInfo)."""

    max_image_bytes: int
    max_image_pixels: int
    max_batch: int
    max_message_bytes: int
    stream_window: int


def alive_check(context: grpc.ServicerContext) -> Callable[[], bool]:
    """True while the call is active and its deadline has not passed."""

    def alive() -> bool:
        if not context.is_active():
            return False
        remaining = context.time_remaining()
        return remaining is None or remaining > 0

    return alive


class EmbedderServicer(embedder_pb2_grpc.EmbedderServiceServicer):
    def __init__(self):
        self._core_parts = None

    def attach(self, embedder, batcher, limits: Limits) -> None:
        """Start answering with this core (an `Embedder` and its `Batcher`) within `limits`."""
        self._core_parts = (embedder, batcher, limits)

    def _core(self):
        if self._core_parts is None:
            raise errors.Unavailable("the embedder is still loading its model (health NOT_SERVING); retry shortly")
        return self._core_parts

    # ------------------------------------------------------------ RPCs

    def Embed(self, request: embedder_pb2.EmbedRequest, context) -> embedder_pb2.EmbedResponse:
        embedder, batcher, _ = self._core()
        future = batcher.submit((request.image, request.name or "image"), alive_check(context))
        vector = future.result()  # raises the item's domain error (InvalidImage, ResourceExhausted, ...)
        return embedder_pb2.EmbedResponse(vector=vector.tolist(), fingerprint=embedder.info.fingerprint)

    def EmbedStream(self, request_iterator, context):
        embedder, batcher, limits = self._core()
        fingerprint = embedder.info.fingerprint
        items = ((req.id, (req.image, f"item {req.id!r}")) for req in request_iterator)
        for item_id, future in batcher.map_stream(items, window=limits.stream_window,
                                                  alive=alive_check(context)):
            yield _stream_response(item_id, future, fingerprint)

    def GetModelInfo(self, request, context) -> embedder_pb2.GetModelInfoResponse:
        embedder, _, limits = self._core()
        info = embedder.info
        return embedder_pb2.GetModelInfoResponse(
            backbone=info.backbone, dim=info.dim, input_size=info.spec.input_size,
            mean=info.spec.mean, std=info.spec.std, interpolation=info.spec.interpolation,
            device=info.device, fingerprint=info.fingerprint, weights=info.weights,
            class_names=info.class_names, max_image_bytes=limits.max_image_bytes,
            max_image_pixels=limits.max_image_pixels, max_batch=limits.max_batch,
            max_message_bytes=limits.max_message_bytes)


def _stream_response(item_id: str, future: futures.Future, fingerprint: str) -> embedder_pb2.EmbedStreamResponse:
    exc = future.exception()
    if exc is None:
        return embedder_pb2.EmbedStreamResponse(
            id=item_id, embedding=embedder_pb2.Embedding(vector=future.result().tolist()), fingerprint=fingerprint)
    if not isinstance(exc, errors.ImageSearchError):
        log.error("item %r failed: %s: %s", item_id, type(exc).__name__, exc)
        exc = errors.ImageSearchError(f"item {item_id!r}: internal error ({type(exc).__name__}: {exc})")
    code, message = serving.item_error_fields(exc)
    log.info("EmbedStream item %r -> %s", item_id, message)  # as the interceptor logs a failed Embed
    return embedder_pb2.EmbedStreamResponse(id=item_id, error=common_pb2.ItemError(code=code, message=message))


def register(servicer: EmbedderServicer) -> Callable[[grpc.Server], None]:
    return lambda server: embedder_pb2_grpc.add_EmbedderServiceServicer_to_server(servicer, server)
