"""The connection-level bounds of the serving layer (imagesearch/serving/server.py
`server_options`), each on a real in-process server over real channels, with
short settings so that each test takes seconds:

- HTTP/2 keepalive enforcement: a client pinging more often than the server
  allows gets GOAWAY (`too_many_pings`) and its open call ends UNAVAILABLE;
- `--max-connection-idle`: a connection with no call open is closed (GOAWAY)
  and the channel reconnects for its next call;
- `--max-connection-age` and `--max-connection-age-grace`: a connection gets
  GOAWAY at its age, a call open then finishes within the grace, one that
  runs past the grace ends UNAVAILABLE, and new calls go over a new connection;
- `--max-streams-per-connection`: past N concurrent streams on one connection
  the client queues the next call until one ends, or the server refuses it
  (REFUSED_STREAM: UNAVAILABLE, retried by the project's clients); another
  connection is not affected."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from clients.channels import RetryPolicy, channel_options
from imagesearch import serving
from imagesearch.v1 import ranker_pb2, ranker_pb2_grpc

SERVICE = ranker_pb2.DESCRIPTOR.services_by_name["RankerService"].full_name


class SlowRanker(ranker_pb2_grpc.RankerServiceServicer):
    """Search answers after `top_k` hundredths of a second; counts the Searches running."""

    def __init__(self):
        self.running = 0
        self.peak = 0

    async def Search(self, request, context):
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(request.top_k / 100)
            await context.write(ranker_pb2.SearchResponse(match=ranker_pb2.Match(rank=1, name="a", score=1.0)))
        finally:
            self.running -= 1

    async def GetStats(self, request, context):
        return ranker_pb2.GetStatsResponse(max_top_k=1000)


def start(grpc_server, **bounds):
    fake = SlowRanker()
    config = serving.ServerConfig(host="127.0.0.1", port=0, grace_s=1, **bounds)
    running, _ = grpc_server(lambda s: ranker_pb2_grpc.add_RankerServiceServicer_to_server(fake, s), [SERVICE],
                             config=config)
    return fake, f"127.0.0.1:{running.port}"


def channel(target: str, *options) -> grpc.Channel:
    # Its own connection: gRPC Python channels to one target otherwise share one.
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1), *options])


def search(stub, hundredths: int, timeout: float = 30):
    return list(stub.Search(ranker_pb2.SearchRequest(collection="c", vector=[1.0], top_k=hundredths),
                            timeout=timeout))


def wait_state(ch: grpc.Channel, want: grpc.ChannelConnectivity, timeout: float) -> bool:
    seen = threading.Event()

    def watch(state):
        if state == want:
            seen.set()
    ch.subscribe(watch, try_to_connect=False)
    try:
        return seen.wait(timeout)
    finally:
        ch.unsubscribe(watch)


def test_a_client_pinging_too_often_gets_goaway_too_many_pings(grpc_server):
    _, target = start(grpc_server)
    pinging = [("grpc.keepalive_time_ms", 200), ("grpc.keepalive_timeout_ms", 10000),
               ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1)]
    with channel(target, *pinging) as abusive, channel(target) as polite:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            search(ranker_pb2_grpc.RankerServiceStub(abusive), 1000)  # a 10 s call
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        assert info.value.details() == "Too many pings", info.value.details()  # GOAWAY ENHANCE_YOUR_CALM
        assert time.monotonic() - started < 8
        # The same call on a client within the rules (no pings of its own) is answered.
        assert len(search(ranker_pb2_grpc.RankerServiceStub(polite), 100)) == 1


def test_an_idle_connection_is_closed_and_the_channel_reconnects(grpc_server):
    _, target = start(grpc_server, max_connection_idle_s=0.5)
    with channel(target) as ch:
        stub = ranker_pb2_grpc.RankerServiceStub(ch)
        assert stub.GetStats(ranker_pb2.GetStatsRequest(), timeout=5).max_top_k == 1000
        assert wait_state(ch, grpc.ChannelConnectivity.IDLE, 5), "the server never closed the idle connection"
        assert stub.GetStats(ranker_pb2.GetStatsRequest(), timeout=5).max_top_k == 1000  # reconnects
        # A call open longer than the idle time keeps its connection.
        assert len(search(stub, 150)) == 1


def test_without_an_idle_limit_the_connection_stays(grpc_server):
    _, target = start(grpc_server, max_connection_idle_s=0)
    with channel(target) as ch:
        ranker_pb2_grpc.RankerServiceStub(ch).GetStats(ranker_pb2.GetStatsRequest(), timeout=5)
        assert not wait_state(ch, grpc.ChannelConnectivity.IDLE, 1.5)


def test_a_connection_is_closed_at_its_age_and_calls_in_flight_get_the_grace(grpc_server):
    _, target = start(grpc_server, max_connection_age_s=1.0, max_connection_age_grace_s=2.0)
    with channel(target) as ch:
        stub = ranker_pb2_grpc.RankerServiceStub(ch)
        results: dict[str, object] = {}

        def call(name, hundredths):
            try:
                results[name] = search(stub, hundredths)
            except grpc.RpcError as exc:
                results[name] = exc

        started = time.monotonic()
        within = threading.Thread(target=call, args=("within", 200))   # ends at ~2 s: inside age + grace
        past = threading.Thread(target=call, args=("past", 1000))      # would end at 10 s: past age + grace
        within.start()
        past.start()
        within.join(20)
        past.join(20)
        assert isinstance(results["within"], list) and len(results["within"]) == 1, results["within"]
        assert isinstance(results["past"], grpc.RpcError), results["past"]
        assert results["past"].code() == grpc.StatusCode.UNAVAILABLE, results["past"]
        assert time.monotonic() - started < 6  # cut at about age + grace (3 s), not at 10 s
        # New calls go over a new connection.
        assert stub.GetStats(ranker_pb2.GetStatsRequest(), timeout=5).max_top_k == 1000


def test_streams_past_the_per_connection_cap_wait_for_a_free_one(grpc_server):
    fake, target = start(grpc_server, max_streams_per_connection=2)
    # The project's client channel options (retries on UNAVAILABLE), on a connection of its own.
    options = [*channel_options([SERVICE], retry=RetryPolicy(), max_message_bytes=1 << 20),
               ("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(target, options=options) as ch, channel(target) as other:
        stub = ranker_pb2_grpc.RankerServiceStub(ch)
        # Settings (MAX_CONCURRENT_STREAMS) arrive with the connection: connect first.
        stub.GetStats(ranker_pb2.GetStatsRequest(), timeout=5)
        results: list[object] = []

        def call(hundredths):
            try:
                results.append(len(search(stub, hundredths)))
            except grpc.RpcError as exc:
                results.append(exc)

        held = [threading.Thread(target=call, args=(150,)) for _ in range(2)]
        for t in held:
            t.start()
        deadline = time.monotonic() + 5
        while fake.running < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fake.running == 2
        # The third stream on this connection waits: it cannot finish while the two run...
        with pytest.raises(grpc.RpcError) as info:
            stub.GetStats(ranker_pb2.GetStatsRequest(), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # ... while another connection is served at once.
        assert ranker_pb2_grpc.RankerServiceStub(other).GetStats(ranker_pb2.GetStatsRequest(), timeout=1)
        # Queued calls start as streams end, never more than 2 at once; one the server sees past
        # the cap is refused (RST_STREAM REFUSED_STREAM: UNAVAILABLE), which the client retries.
        waiting = [threading.Thread(target=call, args=(30,)) for _ in range(4)]
        for t in waiting:
            t.start()
        for t in held + waiting:
            t.join(30)
        assert results == [1] * 6, results
        assert fake.peak == 2, fake.peak
