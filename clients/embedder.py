"""`EmbedderClient`: the EmbedderService through its generated stub.

Every call has a deadline; UNAVAILABLE is retried by gRPC's retry policy; the
message limit comes from GetModelInfo; a comma-separated list of replicas is
balanced by gRPC's round_robin (each call and each stream goes to the next
replica, so bulk work is cut into several concurrent streams). An embedder
that serves several models: `model` names the one every call of this client
goes to ("" = the server's default)."""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import queue
import threading
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterator, Sequence

import grpc

from clients import wire
from clients.base import ServiceClient
from clients.errors import SERVE_HINT, ClientError, UsageError
from clients.types import Embedding, Failure, ModelInfo
from imagesearch import defaults
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = embedder_pb2.DESCRIPTOR.services_by_name["EmbedderService"].full_name
DEFAULT_ADDRESS = defaults.EMBEDDER_ADDRESS
ADDRESS_ENV = defaults.EMBEDDER_ENV
HINT = SERVE_HINT.format(flag="--embedder", env=ADDRESS_ENV)


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """An item to embed: its name and a loader for its bytes (read lazily, so a
    large folder is never held in memory). The loader raises OSError or
    ClientError for a file that cannot be sent; that item gets a Failure."""

    name: str
    load: Callable[[], bytes]


class EmbedderClient(ServiceClient):
    what = "embedder"
    hint = HINT
    service = SERVICE
    stub_class = embedder_pb2_grpc.EmbedderServiceStub
    default_address = DEFAULT_ADDRESS
    _info: ModelInfo | None = None  # GetModelInfo's answer, once asked

    def __init__(self, address: str | None = None, *, model: str = "", **kwargs):
        self.model = model
        super().__init__(address, **kwargs)

    def with_model(self, model: str) -> EmbedderClient:
        """A new client, with this one's settings, for another model the embedder serves."""
        return EmbedderClient(self.address, security=self.security, timeout=self.timeout, model=model)

    @property
    def replicas(self) -> int:
        return max(1, self.address.count(",") + 1)

    def model_info(self, *, refresh: bool = False) -> ModelInfo:
        """GetModelInfo of this client's model, cached. The first call also adopts
        the server's message limit for this channel (reopening it when it differs)."""
        if self._info is None or refresh:
            self.models()
        return self._info

    def models(self) -> list[ModelInfo]:
        """Every model the embedder serves, the default first (GetModelInfo, asked afresh)."""
        try:
            reply = self.stub.GetModelInfo(embedder_pb2.GetModelInfoRequest(model=self.model), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        self._info = info = wire.model_info(reply)
        if info.max_message_bytes and info.max_message_bytes != self._channel.max_message_bytes:
            log.debug("adopting the embedder's message limit of %d bytes", info.max_message_bytes)
            old = self._channel
            self._open(info.max_message_bytes)
            old.close()
        return [wire.model_info(m) for m in reply.models] or [info]  # a server that lists no models serves one

    def embed(self, image: bytes, name: str = "", *, timeout: float | None = None) -> Embedding:
        """One image -> its vector. Bad input raises a UsageError naming it."""
        try:
            reply = self.stub.Embed(embedder_pb2.EmbedRequest(image=image, name=name, model=self.model),
                                    timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise self._error(exc, hint=f"input {name!r}" if name else "") from None
        return Embedding(name, wire.vector(reply.vector), reply.fingerprint)

    def embed_stream(self, items: Sequence[ImageSource], *,
                     timeout: float | None = None) -> Iterator[Embedding | Failure]:
        """One EmbedStream call over `items`: yields one Embedding or Failure per
        item as answers arrive (out of order). Items whose bytes cannot be
        loaded fail without being sent. A failing call raises ClientError
        after yielding what was answered."""
        by_name = {item.name: item for item in items}
        if len(by_name) != len(items):
            raise ValueError("embed_stream: item names must be unique")
        unsent: list[Failure] = []
        lock = threading.Lock()

        def requests():
            for item in items:
                try:
                    data = item.load()
                except OSError as exc:
                    failed = Failure(item.name, grpc.StatusCode.INVALID_ARGUMENT,
                                     f"cannot read {item.name}: {exc.strerror or exc}")
                except ClientError as exc:
                    failed = Failure(item.name, exc.code or grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                else:
                    yield embedder_pb2.EmbedStreamRequest(id=item.name, image=data, model=self.model)
                    continue
                with lock:
                    unsent.append(failed)

        answered: set[str] = set()
        call = self.stub.EmbedStream(requests(), timeout=timeout or self.stream_deadline(len(items)))
        try:
            for reply in call:
                if reply.id not in by_name or reply.id in answered:
                    log.warning("the embedder answered an unknown or repeated id %r; ignored", reply.id[:200])
                    continue
                answered.add(reply.id)
                if reply.HasField("error"):
                    yield wire.failure(reply.id, reply.error)
                else:
                    yield Embedding(reply.id, wire.vector(reply.embedding.vector), reply.fingerprint)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        finally:
            call.cancel()  # a no-op once the call has ended; stops it if the caller walked away
        with lock:
            for failed in unsent:
                answered.add(failed.name)
                yield failed
        for item in items:
            if item.name not in answered:
                yield Failure(item.name, grpc.StatusCode.INTERNAL,
                              f"the embedder at {self.address} ended the stream without answering")

    def embed_many(self, items: Sequence[ImageSource], *, chunk_size: int = 32,
                   concurrency: int | None = None) -> Iterator[Embedding | Failure]:
        """Bulk embedding: `items` cut into chunks, each its own EmbedStream,
        `concurrency` streams at a time (default: 2 per replica, so round_robin
        keeps every replica busy). Yields outcomes as they arrive. A chunk whose
        call fails yields Failures for its unanswered items (the others go on)."""
        chunks = [list(items[i:i + chunk_size]) for i in range(0, len(items), max(1, chunk_size))]
        workers = concurrency or 2 * self.replicas
        results: queue.Queue[Embedding | Failure | None] = queue.Queue()

        def run(chunk: list[ImageSource]) -> None:
            done: set[str] = set()
            try:
                for result in self.embed_stream(chunk):
                    done.add(result.name)
                    results.put(result)
            except ClientError as exc:
                for item in chunk:
                    if item.name not in done:
                        results.put(Failure(item.name, exc.code or grpc.StatusCode.UNKNOWN, str(exc)))
            finally:
                results.put(None)

        with futures.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="embed") as pool:
            for chunk in chunks:  # in this thread's context: a trace's current span goes along
                pool.submit(contextvars.copy_context().run, run, chunk)
            remaining = len(chunks)
            while remaining:
                result = results.get()
                if result is None:
                    remaining -= 1
                else:
                    yield result


def file_source(name: str, path, max_bytes: int = 0) -> ImageSource:
    """An ImageSource reading `path`, refusing files over `max_bytes` (the
    server's advertised limit) before they are sent."""
    def load() -> bytes:
        p = Path(path)
        if max_bytes:
            size = p.stat().st_size
            if size > max_bytes:
                raise UsageError(f"{name} is {size} bytes, over the embedder's limit of {max_bytes} bytes",
                                 code=grpc.StatusCode.RESOURCE_EXHAUSTED)
        return p.read_bytes()

    return ImageSource(name, load)
