"""The gRPC face of the embedder (grpc.aio): validate, convert, call the core,
convert back.

Every handler is a coroutine: an open call costs no thread. Decoding runs on
the batcher's decode threads and inference on its model thread; a handler
only submits an item and awaits its future. Encoded images held by calls
(read, not yet embedded) count against one `ByteBudget` shared by every call:
past it a call waits before reading more, so memory does not grow with the
number of streams. Single Embed calls go before stream items, and among
streams the one with fewer items in flight goes first (in the budget and in
the batcher), so one Embed is not queued behind a thousand streams' windows. Domain errors become status codes in the shared
`imagesearch.serving.ErrorMappingInterceptor`; per-item errors inside
`EmbedStream` become `EmbedStreamResponse.error` and the stream goes on.
Several models may be served, each an `Embedder` with its own `Batcher`; a
request names one (`model`, "" = the default), and the limits and the byte
budget are the server's, shared by them all.
Imports no torch: the models arrive through `attach` once every one is
loaded, and until then every RPC answers UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Callable

import grpc

from imagesearch import defaults, errors, serving
from imagesearch.errors import shorten
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = embedder_pb2.DESCRIPTOR.services_by_name["EmbedderService"].full_name
# Bytes a stream reserves for its first image before reading it (then: its last image's size).
FIRST_IMAGE_GUESS = 256 * 1024
_END = object()


@dataclasses.dataclass(frozen=True)
class Limits:
    """The server's advertised limits (GetModelInfo) and its in-flight bounds."""

    max_image_bytes: int
    max_image_pixels: int
    max_batch: int
    max_message_bytes: int
    stream_window: int
    max_inflight_image_bytes: int = defaults.MAX_INFLIGHT_IMAGE_BYTES
    max_streams: int = defaults.MAX_EMBED_STREAMS  # EmbedStream calls open at once; 0 = no cap


@dataclasses.dataclass
class _Model:
    name: str
    embedder: object
    batcher: object


@dataclasses.dataclass
class _Core:
    models: dict[str, _Model]  # the default first
    limits: Limits
    budget: serving.ByteBudget

    def model(self, name: str) -> _Model:
        """The model a request names; "" = the default."""
        default = next(iter(self.models))
        found = self.models.get(name or default)
        if found is None:
            raise errors.NotFound(f"no model {shorten(name)!r} here: this embedder serves "
                                  f"{', '.join(self.models)} (\"\" = {default})")
        return found


def call_alive(context) -> Callable[[], bool]:
    """For the batcher's threads: True while the call is open and its deadline
    has not passed (read from a flag and a clock, never from the call itself)."""
    remaining = context.time_remaining()
    deadline = None if remaining is None else time.monotonic() + remaining
    ended = threading.Event()
    context.add_done_callback(lambda _call: ended.set())

    def alive() -> bool:
        return not ended.is_set() and (deadline is None or time.monotonic() < deadline)

    return alive


def check_label(text: str, what: str) -> None:
    """A client's name or id: at most MAX_CLIENT_TEXT_CHARS characters."""
    if len(text) > defaults.MAX_CLIENT_TEXT_CHARS:
        raise errors.InvalidArgument(
            f"{what} {shorten(text)!r} is {len(text)} characters; the limit is {defaults.MAX_CLIENT_TEXT_CHARS}")


class EmbedderServicer(embedder_pb2_grpc.EmbedderServiceServicer):
    def __init__(self):
        self.ready: serving.Readiness[_Core] = serving.Readiness(
            "the embedder is still loading its model (health NOT_SERVING); retry shortly")
        self.streams = 0  # EmbedStream calls open

    def attach(self, models: dict[str, tuple[object, object]], limits: Limits) -> None:
        """Start answering with `models` ({name: (`Embedder`, its `Batcher`)}, the
        default first) within `limits`."""
        served = {name: _Model(name, embedder, batcher) for name, (embedder, batcher) in models.items()}
        self.ready.attach(_Core(served, limits, serving.ByteBudget(limits.max_inflight_image_bytes)))

    # ------------------------------------------------------------ RPCs

    async def Embed(self, request: embedder_pb2.EmbedRequest, context) -> embedder_pb2.EmbedResponse:
        core = self.ready.core()
        model = core.model(request.model)
        name = request.name or "image"
        check_label(name, "name")
        held = await core.budget.acquire(len(request.image), rank=(0, 0))
        try:
            future = model.batcher.submit((request.image, name), call_alive(context), priority=0)
            vector = await asyncio.wrap_future(future)  # the item's domain error, if any, raises here
        finally:
            core.budget.release(held)
        return embedder_pb2.EmbedResponse(vector=vector.tolist(), fingerprint=model.embedder.info.fingerprint)

    async def EmbedStream(self, requests, context) -> None:
        core = self.ready.core()
        cap = core.limits.max_streams
        if cap and self.streams >= cap:
            log.info("refused an EmbedStream from %s: %d open (--max-streams)", shorten(context.peer()), self.streams)
            raise errors.ResourceExhausted(
                f"{self.streams} EmbedStream calls are open, the server's cap (--max-streams {cap}): "
                "retry later, or use Embed")
        self.streams += 1
        try:
            await self._embed_stream(core, requests, context)
        finally:
            self.streams -= 1

    async def _embed_stream(self, core: _Core, requests, context) -> None:
        alive = call_alive(context)
        source = object()  # this stream's items are ranked together in the batcher and the byte budget
        window = asyncio.Semaphore(core.limits.stream_window)
        bulk_limit = core.budget.capacity * 3 // 4  # streams leave a quarter for single Embed calls
        done: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Future] = set()

        def finished(item_id: str, fingerprint: str, held: int, future: asyncio.Future) -> None:
            # Here, so a call that ends early still gives its bytes back. (Answers are not
            # charged: a stream that never reads would then starve every other call;
            # its unwritten answers are bounded by its window instead.)
            core.budget.release(held)
            pending.discard(future)
            done.put_nowait((item_id, future, fingerprint))

        async def feed(reader: serving.StreamReader) -> None:
            # The window and the bytes are taken before a message is read, so an
            # unread message stays in the client and the kernel, not in this process:
            # a guess (the stream's last image size) first, the difference after.
            count, failure, guess = 0, None, min(FIRST_IMAGE_GUESS, core.limits.max_image_bytes)
            held = 0  # bytes this task holds for a message not yet handed to the batcher
            try:
                while True:
                    await window.acquire()
                    held = await core.budget.acquire(guess, rank=(1, len(pending)), limit=bulk_limit)
                    request = await reader.next()
                    if request is None:
                        break
                    size = min(len(request.image), core.budget.capacity)  # an item past the cap holds all of it
                    if size > held:
                        # The guess is given back and the whole size asked for: waiting for
                        # more while holding some could deadlock streams on one another.
                        core.budget.release(held)
                        held = 0
                        held = await core.budget.acquire(size, rank=(1, -1), limit=bulk_limit)
                    elif size < held:
                        core.budget.release(held - size)
                        held = size
                    guess = max(size, 1)
                    count += 1
                    try:
                        check_label(request.id, "item id")
                        model = core.model(request.model)
                    except (errors.InvalidArgument, errors.NotFound) as exc:
                        core.budget.release(held)
                        held = 0
                        failed = asyncio.get_running_loop().create_future()
                        failed.set_exception(exc)
                        done.put_nowait((request.id, failed, ""))
                        continue
                    future = asyncio.wrap_future(
                        model.batcher.submit((request.image, f"item {request.id!r}"), alive, source, priority=1))
                    pending.add(future)
                    future.add_done_callback(
                        lambda f, i=request.id, p=model.embedder.info.fingerprint, h=held: finished(i, p, h, f))
                    held = 0
            except errors.ImageSearchError as exc:  # e.g. the batcher is shutting down
                failure = exc
            finally:
                core.budget.release(held)  # ended (or cancelled) between reading and submitting
            done.put_nowait((_END, (count, failure or reader.failure), ""))

        async with serving.StreamReader(requests, ahead=0) as reader:
            feeder = asyncio.get_running_loop().create_task(feed(reader))
            expected, failure, handed = None, None, 0
            try:
                while expected is None or handed < expected:
                    item_id, result, fingerprint = await done.get()
                    if item_id is _END:
                        expected, failure = result
                        continue
                    await context.write(_stream_response(item_id, result, fingerprint))
                    handed += 1
                    window.release()
            finally:
                feeder.cancel()
                for future in list(pending):
                    future.cancel()  # their callbacks give their bytes back
        if failure is not None:
            raise failure

    async def GetModelInfo(self, request, context) -> embedder_pb2.GetModelInfoResponse:
        core = self.ready.core()
        described = _model_info(core.model(request.model), core.limits)
        described.models.extend(_model_info(model, core.limits) for model in core.models.values())
        return described


def _model_info(model: _Model, limits: Limits) -> embedder_pb2.GetModelInfoResponse:
    info = model.embedder.info
    return embedder_pb2.GetModelInfoResponse(
        model=model.name, backbone=info.backbone, dim=info.dim, input_size=info.spec.input_size,
        mean=info.spec.mean, std=info.spec.std, interpolation=info.spec.interpolation,
        device=info.device, fingerprint=info.fingerprint, weights=info.weights,
        class_names=info.class_names, max_image_bytes=limits.max_image_bytes,
        max_image_pixels=limits.max_image_pixels, max_batch=limits.max_batch,
        max_message_bytes=limits.max_message_bytes, engine=info.engine, precision=info.precision,
        decode=info.spec.decode, max_streams=limits.max_streams, stream_window=limits.stream_window)


def _stream_response(item_id: str, future: asyncio.Future, fingerprint: str) -> embedder_pb2.EmbedStreamResponse:
    exc = future.exception()
    if exc is None:
        return embedder_pb2.EmbedStreamResponse(
            id=item_id, embedding=embedder_pb2.Embedding(vector=future.result().tolist()), fingerprint=fingerprint)
    return embedder_pb2.EmbedStreamResponse(
        id=item_id, error=serving.item_error(exc, "EmbedStream", f"item {item_id!r}"))


def register(servicer: EmbedderServicer) -> Callable[[grpc.aio.Server], None]:
    return lambda server: embedder_pb2_grpc.add_EmbedderServiceServicer_to_server(servicer, server)
