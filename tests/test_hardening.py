"""Issue 11's server-side findings and bounds, each on a real server: empty
tokens and start-up failures (one line, exit 2), names with control
characters, over-long embedder names and ids (refused, never logged whole),
malformed protobuf (INVALID_ARGUMENT, no ERROR line), the stream idle timeout,
the health Watch cap, the EmbedStream cap, the in-flight image byte budget and
Search paging."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedder_service.batcher import Batcher
from embedder_service.servicer import SERVICE_NAME as EMBEDDER
from embedder_service.servicer import EmbedderServicer, Limits
from embedder_service.servicer import register as register_embedder
from imagesearch import serving
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc, ranker_pb2, ranker_pb2_grpc
from ranker_service.sqlite.backend import SqliteBackend
from ranker_service.servicer import SERVICE_NAME as RANKER
from ranker_service.servicer import RankerServicer
from ranker_service.servicer import register as register_ranker
from ranker_service.sqlite.store import Store
from tests.certs import make_pki
from tests.conftest import ROOT

# ---------------------------------------------------------------- in-process servers over the real servicers


class _Info:
    fingerprint = "fp"


class _FakeEmbedder:
    """The servicer's view of an Embedder: `info` (the batcher does the work)."""

    info = _Info()


def start_embedder(grpc_server, config=None, **limits):
    batcher = Batcher(lambda item: item[0], lambda items: [np.full(4, 0.5, np.float32) for _ in items],
                      max_batch=4, max_wait_s=0.001)
    servicer = EmbedderServicer()
    servicer.attach({"default": (_FakeEmbedder(), batcher)}, Limits(**{
        "max_image_bytes": 1 << 20, "max_image_pixels": 1 << 20, "max_batch": 4, "max_message_bytes": 2 << 20,
        "stream_window": 4, **limits}))
    _, channel = grpc_server(register_embedder(servicer), [EMBEDDER], config=config)
    return embedder_pb2_grpc.EmbedderServiceStub(channel), channel


@pytest.fixture
def ranker(grpc_server, tmp_path):
    def start(config=None):
        gallery = SqliteBackend(Store.open(tmp_path / "g.db"))
        gallery.load()
        servicer = RankerServicer()
        servicer.attach(gallery)
        _, channel = grpc_server(register_ranker(servicer), [RANKER], config=config)
        return ranker_pb2_grpc.RankerServiceStub(channel), channel
    return start


def unit(dim=8, seed=0):
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return (v / np.linalg.norm(v)).tolist()


# ---------------------------------------------------------------- names and ids


@pytest.mark.parametrize("bad", ["a\x1b]0;pwned\x07.jpg", "line\rforged hit", "tab\there", "bell\x07"])
def test_ranker_refuses_names_with_control_characters(ranker, bad):
    stub, _ = ranker()
    with pytest.raises(grpc.RpcError) as info:
        stub.Upsert(iter([ranker_pb2.UpsertRequest(collection="c", name=bad, vector=unit())]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "control characters" in info.value.details()
    assert bad not in info.value.details()  # shown escaped
    ok = stub.Upsert(iter([ranker_pb2.UpsertRequest(collection="c", name="fine name é.jpg", vector=unit())]),
                     timeout=10)
    assert ok.upserted == 1


def test_an_error_answer_never_repeats_a_huge_client_string_whole(ranker):
    stub, _ = ranker()
    stub.Upsert(iter([ranker_pb2.UpsertRequest(collection="c", name="a", vector=unit())]), timeout=10)
    huge = "q" * 1_000_000
    (answer,) = stub.SearchStream(iter([ranker_pb2.SearchStreamRequest(id=huge, collection="c", vector=unit(dim=4),
                                                                       top_k=1)]), timeout=30)
    assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert len(answer.error.message) < 1100 and "dimension" in answer.error.message, answer.error.message[-300:]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Search(ranker_pb2.SearchRequest(collection=huge, vector=unit(), top_k=1), timeout=30))
    assert len(info.value.details()) < 1100


def test_unread_search_answers_are_bounded_in_total_and_small_searches_go_on(grpc_server, tmp_path):
    """Large answers nobody reads hold at most a quarter of the answer room;
    the searches past it wait before searching; a small search still answers,
    and every waiting search answers once the earlier ones are read."""
    gallery = SqliteBackend(Store.open(tmp_path / "g.db"))
    gallery.load()
    room = 1000 * 256 * 12  # three answers of 1000 matches in its quarter
    servicer = RankerServicer(answer_room_bytes=room)
    servicer.attach(gallery)
    _, channel = grpc_server(register_ranker(servicer), [RANKER])
    stub = ranker_pb2_grpc.RankerServiceStub(channel)
    stub.Upsert(iter([ranker_pb2.UpsertRequest(collection="c", name=f"n{i}", vector=unit(seed=i))
                      for i in range(1200)]), timeout=30)
    unread = [stub.Search(ranker_pb2.SearchRequest(collection="c", vector=unit(seed=i), top_k=1000), timeout=60)
              for i in range(10)]
    deadline = time.monotonic() + 10
    while len(servicer.answers._waiters) < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert servicer.answers.used <= room // 4 and len(servicer.answers._waiters) == 7
    started = time.monotonic()
    small = list(stub.Search(ranker_pb2.SearchRequest(collection="c", vector=unit(), top_k=10), timeout=10))
    assert len(small) == 10 and time.monotonic() - started < 5
    assert [len(list(call)) for call in unread] == [1000] * 10
    assert servicer.answers.used == 0


def test_embedder_caps_names_and_ids_and_never_logs_them_whole(grpc_server, caplog):
    caplog.set_level(logging.INFO)
    stub, _ = start_embedder(grpc_server)
    long_name = "n" * 20_000
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(embedder_pb2.EmbedRequest(image=b"img", name=long_name), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # not gRPC's metadata RESOURCE_EXHAUSTED
    assert "20000 characters; the limit is 1024" in info.value.details()
    assert stub.Embed(embedder_pb2.EmbedRequest(image=b"img", name="n" * 1024), timeout=10).fingerprint == "fp"

    long_id = "i" * (1 << 20)
    answers = list(stub.EmbedStream(iter([embedder_pb2.EmbedStreamRequest(id=long_id, image=b"img"),
                                          embedder_pb2.EmbedStreamRequest(id="ok", image=b"img")]), timeout=10))
    by_id = {a.id: a for a in answers}
    assert by_id[long_id].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert by_id["ok"].WhichOneof("result") == "embedding"
    assert len(caplog.text) < 20_000, "a client's string reached the log whole"
    assert "n" * 200 not in caplog.text and "i" * 200 not in caplog.text


# ---------------------------------------------------------------- malformed protobuf


def test_malformed_requests_get_invalid_argument_without_an_error_line(ranker, caplog):
    caplog.set_level(logging.INFO)
    _, channel = ranker()
    truncated = b"\x0a\x05ab"  # field 1 claims 5 bytes, 2 follow
    unary = channel.unary_unary(f"/{RANKER}/GetStats")
    with pytest.raises(grpc.RpcError) as info:
        unary(truncated, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf" in info.value.details()
    streaming = channel.stream_unary(f"/{RANKER}/Upsert")
    with pytest.raises(grpc.RpcError) as info:
        streaming(iter([truncated]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    server_stream = channel.unary_stream(f"/{RANKER}/Search")
    with pytest.raises(grpc.RpcError) as info:
        list(server_stream(truncated, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# ---------------------------------------------------------------- bounds


def test_a_silent_stream_ends_after_the_idle_timeout_and_others_go_on(ranker):
    config = serving.ServerConfig(port=0, grace_s=1, stream_idle_timeout_s=1.0)
    stub, _ = ranker(config)
    started = time.monotonic()

    def silent():
        time.sleep(30)
        yield ranker_pb2.SearchStreamRequest()
    call = stub.SearchStream(silent(), timeout=20)
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    took = time.monotonic() - started
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--stream-idle-timeout" in info.value.details()
    assert 0.9 <= took < 10, took
    # a stream that keeps talking is not idle, however long it lasts
    stub.Upsert(iter([ranker_pb2.UpsertRequest(collection="c", name="a", vector=unit())]), timeout=10)

    def chatty():
        for i in range(6):
            time.sleep(0.4)
            yield ranker_pb2.SearchStreamRequest(id=str(i), collection="c", vector=unit())
    assert len(list(stub.SearchStream(chatty(), timeout=20))) == 6


def test_health_watch_streams_are_capped_and_check_still_answers(grpc_server):
    config = serving.ServerConfig(port=0, grace_s=1, max_health_watches=3)
    _, channel = grpc_server(lambda server: None, [], config=config)
    health = health_pb2_grpc.HealthStub(channel)
    watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=20) for _ in range(3)]
    assert all(next(w).status == health_pb2.HealthCheckResponse.SERVING for w in watches)
    with pytest.raises(grpc.RpcError) as info:
        next(health.Watch(health_pb2.HealthCheckRequest(), timeout=5))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    watches[0].cancel()
    deadline = time.monotonic() + 5
    while True:  # the cancelled watch's slot comes back
        try:
            assert next(health.Watch(health_pb2.HealthCheckRequest(), timeout=5)).status
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    for w in watches:
        w.cancel()


def test_byte_budget_bounds_what_is_held_first_come_first_served():
    async def run():
        budget = serving.ByteBudget(100)
        order = []
        assert await budget.acquire(60) == 60

        async def take(n, tag):
            got = await budget.acquire(n)
            order.append(tag)
            return got
        big = asyncio.ensure_future(take(70, "big"))
        small = asyncio.ensure_future(take(10, "small"))  # fits, but waits its turn behind big
        await asyncio.sleep(0.01)
        assert order == [] and budget.used == 60
        budget.release(60)
        await asyncio.gather(big, small)
        assert order == ["big", "small"] and budget.used == 80
        huge = await asyncio.wait_for(asyncio.ensure_future(_after(budget, 80)), 1)
        assert huge == 100  # one item over the whole budget waits for an empty budget, then passes
        cancelled = asyncio.ensure_future(budget.acquire(50))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.sleep(0.01)
        budget.release(100)
        assert budget.used == 0

    async def _after(budget, release):
        waiter = asyncio.ensure_future(budget.acquire(10**6))
        await asyncio.sleep(0.01)
        budget.release(release)
        return await waiter

    asyncio.run(run())


def test_embed_calls_wait_for_the_in_flight_byte_budget(grpc_server):
    stub, _ = start_embedder(grpc_server, max_inflight_image_bytes=10)
    # each image is over the whole budget: they pass one at a time, none is refused
    futures = [stub.Embed.future(embedder_pb2.EmbedRequest(image=b"x" * 50, name=str(i)), timeout=20)
               for i in range(8)]
    assert all(f.result().fingerprint == "fp" for f in futures)
    answers = list(stub.EmbedStream(iter([embedder_pb2.EmbedStreamRequest(id=str(i), image=b"y" * 50)
                                          for i in range(8)]), timeout=20))
    assert sorted(a.id for a in answers) == [str(i) for i in range(8)]


def test_embed_streams_past_the_cap_are_refused_and_the_rest_go_on(grpc_server):
    stub, _ = start_embedder(grpc_server, max_streams=2)
    release = threading.Event()

    def held(i):
        yield embedder_pb2.EmbedStreamRequest(id=f"{i}", image=b"img")
        release.wait(20)

    open_streams = [stub.EmbedStream(held(i), timeout=30) for i in range(2)]
    try:
        assert [next(s).id for s in open_streams] == ["0", "1"]  # both running
        with pytest.raises(grpc.RpcError) as info:
            list(stub.EmbedStream(iter([embedder_pb2.EmbedStreamRequest(id="x", image=b"img")]), timeout=10))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 EmbedStream calls are open, the server's cap (--max-streams 2)" in info.value.details()
        assert stub.Embed(embedder_pb2.EmbedRequest(image=b"img"), timeout=10).fingerprint == "fp"  # not capped
    finally:
        release.set()
    for s in open_streams:
        assert list(s) == []
    # the cap counts open streams: once they end, a new one is served
    assert [a.id for a in stub.EmbedStream(iter([embedder_pb2.EmbedStreamRequest(id="y", image=b"img")]),
                                           timeout=10)] == ["y"]


def test_search_pages_hold_the_same_matches_as_one_per_message(ranker):
    stub, _ = ranker()
    items = [ranker_pb2.UpsertRequest(collection="c", name=f"n{i:03d}", vector=unit(seed=i)) for i in range(50)]
    stub.Upsert(iter(items), timeout=10)
    query = unit(seed=99)
    one = list(stub.Search(ranker_pb2.SearchRequest(collection="c", vector=query, top_k=23), timeout=10))
    assert all(r.HasField("match") and not r.matches for r in one)
    paged = list(stub.Search(ranker_pb2.SearchRequest(collection="c", vector=query, top_k=23, page_size=10),
                             timeout=10))
    assert [len(r.matches) for r in paged] == [10, 10, 3] and not any(r.HasField("match") for r in paged)
    assert [(m.rank, m.name, m.score) for r in paged for m in r.matches] == \
        [(r.match.rank, r.match.name, r.match.score) for r in one]


# ---------------------------------------------------------------- start-up: one line, exit 2


def run_server(module, *args, env=None, timeout=60):
    import os
    full_env = {**os.environ, **(env or {})}
    full_env.pop("IMAGESEARCH_AUTH_TOKEN", None) if env is None or "IMAGESEARCH_AUTH_TOKEN" not in env else None
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=full_env, check=False)


def assert_one_line_exit_2(proc, *needles):
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], proc.stderr


@pytest.mark.parametrize("how", ["flag", "blank flag", "env", "empty flag over env"])
def test_an_empty_token_is_refused_at_start_up(tmp_path, how):
    args = ["--db", str(tmp_path / "g.db"), "--port", "0"]
    env = {}
    if how == "flag":
        args += ["--auth-token", ""]
    elif how == "blank flag":
        args += ["--auth-token", "   "]
    elif how == "env":
        env["IMAGESEARCH_AUTH_TOKEN"] = ""
    else:
        env["IMAGESEARCH_AUTH_TOKEN"] = "real-token"
        args += ["--auth-token", ""]
    assert_one_line_exit_2(run_server("ranker_service", *args, env=env), "empty")


def test_start_up_log_says_whether_auth_and_tls_are_on(tmp_path):
    from testkit import ServiceProcess

    proc = ServiceProcess("ranker_service", "--db", tmp_path / "g.db", env={"IMAGESEARCH_AUTH_TOKEN": "t0k"})
    try:
        assert "TLS: off (plaintext); auth token: required" in proc.output
        assert "t0k" not in proc.output
    finally:
        proc.terminate()


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = run_server("ranker_service", "--db", str(tmp_path / "g.db"), "--port", str(port))
    assert_one_line_exit_2(proc, "cannot bind", str(port))


def test_a_certificate_and_key_that_do_not_match_are_one_line_and_exit_2(tmp_path):
    good, other = make_pki(tmp_path / "a", "a"), make_pki(tmp_path / "b", "b")
    proc = run_server("ranker_service", "--db", str(tmp_path / "g.db"), "--port", "0",
                      "--tls-cert", str(good.server_cert), "--tls-key", str(other.server_key))
    assert_one_line_exit_2(proc)
    missing = run_server("ranker_service", "--db", str(tmp_path / "g.db"), "--port", "0",
                         "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(good.server_key))
    assert_one_line_exit_2(missing, "nope.pem")
