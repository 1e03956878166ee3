"""Abusive clients against a running service, with a well-behaved client on
its own connection beside them. Torch-free; `bench/abuse.py` prints
the table, `tests/test_abuse.py` runs a smaller version in CI.

Kinds of abuse, each N streams opened over N / `per_connection` connections
and left open while the good client keeps calling:

- `watch`: health Watch streams without a token, never cancelled.
- `embed_silent`: EmbedStream calls that never send a message.
- `embed_flood`: EmbedStream calls that send 256 KB images and never read.
- `upsert_silent`: Upsert calls that never send.
- `search_silent`: SearchStream calls that never send.
- `search_unread`: Search calls with top_k=1000 whose answers are never read.
- `backup_unread`: Backup calls whose copies are never read (the server caps
  them: the rest are refused and counted).

The good client measures each of its calls (latency, failure) and the
server's resident memory is sampled from /proc during the run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import math
import threading
import time
from collections.abc import Callable, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc, ranker_pb2, ranker_pb2_grpc

KINDS = {
    "embedder": ("watch", "embed_silent", "embed_flood"),
    "ranker": ("watch", "upsert_silent", "search_silent", "search_unread", "backup_unread"),
}
MESSAGE_BYTES = 64 << 20


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def noise_jpeg(target_bytes: int = 256 * 1024, seed: int = 0) -> bytes:
    """A JPEG of random pixels about `target_bytes` long (it decodes: the server does real work)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    side = 128
    while True:
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=95)
        if buf.tell() >= target_bytes:
            return buf.getvalue()
        side = int(side * math.sqrt(target_bytes / buf.tell())) + 8


@dataclasses.dataclass
class Result:
    service: str
    kind: str  # "none" for the unloaded baseline
    streams: int
    seconds: float
    latencies: dict[str, list[float]]
    failures: list[str]
    rss_before: int
    rss_peak: int
    abusers_refused: int = 0

    @property
    def rss_growth(self) -> int:
        return max(0, self.rss_peak - self.rss_before)

    def pct(self, method: str, p: float) -> float:
        values = sorted(self.latencies.get(method, []))
        if not values:
            return float("nan")
        return values[min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1)]


def batch_seconds(target: str, photo: bytes, metadata=None, items: int = 32) -> float:
    """The time of one full batch here and now: `items` photos on one
    EmbedStream of an otherwise idle embedder (decode and forward)."""
    options = [("grpc.max_receive_message_length", MESSAGE_BYTES), ("grpc.max_send_message_length", MESSAGE_BYTES)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
        requests = [embedder_pb2.EmbedStreamRequest(id=str(i), image=photo) for i in range(items)]
        start = time.perf_counter()
        answers = list(stub.EmbedStream(iter(requests), timeout=600, metadata=metadata))
        took = time.perf_counter() - start
    assert len(answers) == items and all(a.WhichOneof("result") == "embedding" for a in answers)
    return took


# ---------------------------------------------------------------- the well-behaved client


def good_calls(service: str, channel: grpc.Channel, metadata, *, photo: bytes, collection: str,
               query: Sequence[float]) -> dict[str, Callable[[], object]]:
    """Each method the good client calls, as a function that checks its answer."""
    health = health_pb2_grpc.HealthStub(channel)

    def check():
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=30).status
        assert status == health_pb2.HealthCheckResponse.SERVING, status

    if service == "embedder":
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)

        def info():
            assert stub.GetModelInfo(embedder_pb2.GetModelInfoRequest(), timeout=30, metadata=metadata).dim > 0

        def embed():
            answer = stub.Embed(embedder_pb2.EmbedRequest(image=photo, name="good"), timeout=60, metadata=metadata)
            assert abs(float(np.linalg.norm(answer.vector)) - 1) < 1e-3

        return {"health.Check": check, "GetModelInfo": info, "Embed": embed}
    stub = ranker_pb2_grpc.RankerServiceStub(channel)

    def stats():
        assert stub.GetStats(ranker_pb2.GetStatsRequest(), timeout=30, metadata=metadata).max_top_k > 0

    def search():
        answers = list(stub.Search(ranker_pb2.SearchRequest(collection=collection, vector=query, top_k=10),
                                   timeout=30, metadata=metadata))
        assert [a.match.rank for a in answers] == list(range(1, 11)), len(answers)

    return {"health.Check": check, "GetStats": stats, "Search": search}


def run_good_client(target: str, service: str, metadata, stop: threading.Event, latencies: dict,
                    failures: list, **kwargs) -> None:
    options = [("grpc.max_receive_message_length", MESSAGE_BYTES), ("grpc.max_send_message_length", MESSAGE_BYTES)]
    with grpc.insecure_channel(target, options=options) as channel:
        calls = good_calls(service, channel, metadata, **kwargs)
        while not stop.is_set():
            for method, call in calls.items():
                start = time.perf_counter()
                try:
                    call()
                except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
                    failures.append(f"{method}: {type(exc).__name__}: {exc}"[:300])
                latencies.setdefault(method, []).append(time.perf_counter() - start)


# ---------------------------------------------------------------- the abusers


async def _flood(call, image: bytes) -> None:
    i = 0
    try:
        while True:
            await call.write(embedder_pb2.EmbedStreamRequest(id=f"f{i}", image=image))
            i += 1
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError, asyncio.CancelledError):
        return


async def _abuse(target: str, kind: str, n: int, metadata, per_connection: int, opened: threading.Event,
                 stop: asyncio.Event, refused: list, collection: str = "", query: Sequence[float] = ()) -> None:
    options = [("grpc.max_receive_message_length", MESSAGE_BYTES), ("grpc.max_send_message_length", MESSAGE_BYTES)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(math.ceil(n / per_connection))]
    calls, tasks = [], []
    image = noise_jpeg() if kind == "embed_flood" else b""
    try:
        for i in range(n):
            channel = channels[i // per_connection]
            if kind == "watch":
                call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            elif kind in ("embed_silent", "embed_flood"):
                call = embedder_pb2_grpc.EmbedderServiceStub(channel).EmbedStream(metadata=metadata)
                if kind == "embed_flood":
                    tasks.append(asyncio.ensure_future(_flood(call, image)))
            elif kind == "upsert_silent":
                call = ranker_pb2_grpc.RankerServiceStub(channel).Upsert(metadata=metadata)
            elif kind == "search_silent":
                call = ranker_pb2_grpc.RankerServiceStub(channel).SearchStream(metadata=metadata)
            elif kind == "search_unread":
                call = ranker_pb2_grpc.RankerServiceStub(channel).Search(
                    ranker_pb2.SearchRequest(collection=collection, vector=query, top_k=1000), metadata=metadata)
            elif kind == "backup_unread":
                call = ranker_pb2_grpc.RankerServiceStub(channel).Backup(ranker_pb2.BackupRequest(),
                                                                         metadata=metadata)
            else:
                raise ValueError(f"unknown abuse kind {kind!r}")
            calls.append(call)
        if kind == "watch":  # count the Watch streams the server refused (its cap)
            async def first(call):
                try:
                    await asyncio.wait_for(call.read(), 30)
                except (grpc.aio.AioRpcError, asyncio.TimeoutError):
                    refused.append(1)
            await asyncio.gather(*(first(c) for c in calls))
        else:
            await asyncio.sleep(1.0)
        opened.set()
        await stop.wait()
        if kind == "backup_unread":  # count the Backups the server refused (--max-backups)
            for call in calls:
                if call.done() and await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refused.append(1)
        if kind == "embed_silent":  # count the EmbedStreams the server refused (--max-streams)
            for call in calls:
                if call.done() and await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refused.append(1)
    finally:
        opened.set()
        for task in tasks:
            task.cancel()
        for call in calls:
            call.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()


def run(target: str, service: str, kind: str, *, pid: int, streams: int, seconds: float, photo: bytes,
        token: str | None = None, collection: str = "", query: Sequence[float] = (), per_connection: int = 100,
        ) -> Result:
    """Open `streams` abusive streams of `kind` (or none: kind "none"), run the
    good client for `seconds` beside them, and report."""
    metadata = [("authorization", f"Bearer {token}")] if token else None
    latencies: dict[str, list[float]] = {}
    failures: list[str] = []
    refused: list = []
    good_kwargs = dict(photo=photo, collection=collection, query=query)
    # warm the server (first-call allocations are not the abusers' doing)
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", MESSAGE_BYTES)]) as ch:
        for call in good_calls(service, ch, metadata, **good_kwargs).values():
            call()
    rss_before = rss_bytes(pid)
    peak = [rss_before]
    opened = threading.Event()
    loop = asyncio.new_event_loop()
    stop_abuse = asyncio.Event()
    abuser = None
    if kind != "none":
        def abuse_thread():
            asyncio.set_event_loop(loop)
            loop.run_until_complete(_abuse(target, kind, streams, metadata, per_connection, opened, stop_abuse,
                                           refused, collection, query))
        abuser = threading.Thread(target=abuse_thread, name="abusers", daemon=True)
        abuser.start()
        opened.wait(120)
    stop = threading.Event()
    good = threading.Thread(target=run_good_client, args=(target, service, metadata, stop, latencies, failures),
                            kwargs=good_kwargs, name="good-client", daemon=True)
    good.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak[0] = max(peak[0], rss_bytes(pid))
        time.sleep(0.2)
    stop.set()
    good.join(120)
    peak[0] = max(peak[0], rss_bytes(pid))
    if abuser is not None:
        loop.call_soon_threadsafe(stop_abuse.set)
        abuser.join(60)
    loop.close()
    return Result(service, kind, streams if kind != "none" else 0, seconds, latencies, failures, rss_before,
                  peak[0], len(refused))
