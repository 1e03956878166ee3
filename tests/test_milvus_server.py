"""The Milvus backend against a real Milvus standalone server, for what
milvus-lite cannot show: several rankers over one Milvus, and the server's
failures (kill -9 while the ranker serves, and a Milvus not up yet when the
ranker starts). The shared server (`milvus_server`) serves the first; the
failure tests kill theirs, so they start one of their own.

Each failure test prints what it measured (run with -s to see it):
time to UNAVAILABLE, to NOT_SERVING, and to SERVING after Milvus is back.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagesearch.v1 import ranker_pb2 as pb
from imagesearch.v1 import ranker_pb2_grpc
from testkit import ServiceProcess, reference_ranking, unit32
from tests.conftest import milvus_server_or_skip

DIM = 8
FP = "fp"
TIMEOUT = 30
DEADLINE = 5.0  # the deadline of the calls made while Milvus is down
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def ranker(uri: str, **kwargs) -> ServiceProcess:
    return ServiceProcess("ranker_service", "--backend", "milvus", "--milvus-uri", uri, startup_timeout=120,
                          **kwargs)


def upsert(stub, collection, names, vectors, timeout=TIMEOUT):
    return stub.Upsert(iter(pb.UpsertRequest(collection=collection, name=n, vector=v, fingerprint=FP)
                            for n, v in zip(names, vectors)), timeout=timeout)


def search(stub, collection, vector, top_k=10, timeout=TIMEOUT):
    return [r.match.name for r in stub.Search(pb.SearchRequest(collection=collection, vector=vector, top_k=top_k),
                                               timeout=timeout)]


def code_of(fn) -> grpc.StatusCode | None:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return None


def health(proc: ServiceProcess) -> int | None:
    with proc.channel() as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return None


def assert_said_once(proc: ServiceProcess) -> None:
    """Warnings and errors say Milvus is unreachable once, not per call (each
    refused call keeps its INFO line in the access log, as every call does)."""
    loud = [line for line in proc.lines if " WARNING " in line or " ERROR " in line]
    assert len(loud) == 1 and "ranker_service.milvus.link" in loud[0] and "is unreachable (" in loud[0], \
        "\n".join(line[:200] for line in loud)


def wait_for(predicate, timeout: float, what: str) -> float:
    """Seconds until predicate() holds (fails the test past `timeout`)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not {what} after {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - start


# ---------------------------------------------------------------- several rankers over one Milvus

def test_two_rankers_see_each_others_writes_and_collections_at_once(milvus_server, tmp_path):
    uri = milvus_server.database_uri(tmp_path)
    vectors = unit32(np.random.default_rng(1).standard_normal((40, DIM)))
    names = [f"n{i:02d}" for i in range(40)]
    with ranker(uri) as a, ranker(uri) as b, a.channel() as ca, b.channel() as cb:
        sa, sb = ranker_pb2_grpc.RankerServiceStub(ca), ranker_pb2_grpc.RankerServiceStub(cb)
        # a write acknowledged by one is found by a search on the other at once
        for i in range(0, 40, 10):
            upsert(sa, "shared", names[i:i + 10], vectors[i:i + 10])
            for j in range(i, i + 10):
                assert search(sb, "shared", vectors[j], 1) == [names[j]]
        assert search(sb, "shared", vectors[3], 40) == reference_ranking(vectors, names, vectors[3], 40)[0]
        sb.Delete(pb.DeleteRequest(collection="shared", names=names[:5]), timeout=TIMEOUT)
        assert not set(search(sa, "shared", vectors[0], 40)) & set(names[:5])
        # a collection made, dropped and made again through one is seen by the other on its next call
        made = pb.CreateCollectionRequest(collection="made", dim=DIM, fingerprint=FP,
                                          index=pb.IndexOptions(kind=pb.INDEX_KIND_HNSW))
        sa.CreateCollection(made, timeout=TIMEOUT)
        stats = {s.name: s for s in sb.GetStats(pb.GetStatsRequest(), timeout=TIMEOUT).collections}
        assert stats["made"].index.kind == pb.INDEX_KIND_HNSW and stats["shared"].count == 35
        upsert(sb, "made", names[:3], vectors[:3])
        assert search(sa, "made", vectors[2], 1) == [names[2]]
        assert sa.DropCollection(pb.DropCollectionRequest(collection="made"), timeout=TIMEOUT).deleted == 3
        assert code_of(lambda: search(sb, "made", vectors[0])) == grpc.StatusCode.NOT_FOUND
        wider = unit32(np.random.default_rng(2).standard_normal((3, DIM + 4)))
        upsert(sa, "made", names[:3], wider)  # made again, implicitly, with another dimension
        assert search(sb, "made", wider[1], 1) == [names[1]]
        assert code_of(lambda: search(sb, "made", vectors[0])) == grpc.StatusCode.INVALID_ARGUMENT
        (made_stats,) = sb.GetStats(pb.GetStatsRequest(collection="made"), timeout=TIMEOUT).collections
        assert made_stats.dim == DIM + 4 and made_stats.index.kind == pb.INDEX_KIND_EXACT


# ---------------------------------------------------------------- the server's failures

@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    """A server of this module's own, not started: the tests start and kill it."""
    server = milvus_server_or_skip(tmp_path_factory.mktemp("milvus-own"))
    yield server
    server.kill()  # its data is thrown away: no graceful stop to wait for


def test_a_ranker_started_before_milvus_serves_once_it_is_up(own_server):
    with ranker(own_server.uri, wait_serving=False) as proc, proc.channel() as channel:
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        time.sleep(1.5)
        assert health(proc) == NOT_SERVING
        started = time.monotonic()
        assert code_of(lambda: search(stub, "c", [1.0] * DIM, timeout=DEADLINE)) == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < DEADLINE
        own_server.start()
        up = time.monotonic()
        to_serving = wait_for(lambda: health(proc) == SERVING, 60, "SERVING")
        print(f"\nranker started before Milvus: SERVING {to_serving:.2f}s after Milvus answers "
              f"({time.monotonic() - up:.2f}s)")
        vectors = unit32(np.random.default_rng(3).standard_normal((5, DIM)))
        upsert(stub, "c", [f"c{i}" for i in range(5)], vectors)
        assert search(stub, "c", vectors[4], 1) == ["c4"]
        assert_said_once(proc)


def test_kill_9_of_milvus_while_the_ranker_serves(own_server):
    if own_server.proc is None:
        own_server.start()
    vectors = unit32(np.random.default_rng(4).standard_normal((200, DIM)))
    names = [f"k{i:03d}" for i in range(200)]
    with ranker(own_server.uri) as proc, proc.channel() as channel:
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        acknowledged = 0
        for i in range(0, 200, 50):
            acknowledged += upsert(stub, "kept", names[i:i + 50], vectors[i:i + 50]).upserted
        assert acknowledged == 200

        own_server.kill()
        killed = time.monotonic()
        calls = {
            "Search": lambda: search(stub, "kept", vectors[0], timeout=DEADLINE),
            "Upsert": lambda: upsert(stub, "kept", ["late"], vectors[:1], timeout=DEADLINE),
            "GetStats": lambda: stub.GetStats(pb.GetStatsRequest(), timeout=DEADLINE),
            "ListItems": lambda: list(stub.ListItems(pb.ListItemsRequest(collection="kept"), timeout=DEADLINE)),
        }
        first_unavailable = None
        for name, call in calls.items():
            started = time.monotonic()
            code = code_of(call)
            took = time.monotonic() - started
            assert code == grpc.StatusCode.UNAVAILABLE, (name, code)
            assert took < DEADLINE, (name, took)
            first_unavailable = first_unavailable or time.monotonic() - killed
        to_not_serving = wait_for(lambda: health(proc) == NOT_SERVING, 10, "NOT_SERVING")
        to_not_serving += time.monotonic() - killed - to_not_serving
        for _ in range(20):  # many calls while down: refused at once, logged once
            started = time.monotonic()
            assert code_of(calls["Search"]) == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 1.0
        with pytest.raises(grpc.RpcError) as info:
            calls["Search"]()
        assert own_server.uri in info.value.details() and "unreachable" in info.value.details()
        assert_said_once(proc)

        own_server.restart()
        back = time.monotonic()
        to_serving = wait_for(lambda: health(proc) == SERVING, 60, "SERVING again")
        print(f"\nkill -9 of Milvus: first UNAVAILABLE {first_unavailable:.2f}s after the kill, NOT_SERVING "
              f"{to_not_serving:.2f}s after; SERVING {to_serving:.2f}s after Milvus answers again "
              f"(restart took {back - killed:.1f}s)")
        (stats,) = stub.GetStats(pb.GetStatsRequest(collection="kept"), timeout=TIMEOUT).collections
        assert stats.count == 200  # every acknowledged write is there
        for i in range(0, 200, 20):
            assert search(stub, "kept", vectors[i], 1) == [names[i]]
        upsert(stub, "kept", ["after"], vectors[:1])
        assert proc.output.count("answers: serving") == 2, proc.output


def test_a_hung_milvus_ends_calls_within_their_deadline(own_server):
    """Milvus stopped (SIGSTOP: connections open, no answers): each call's Milvus
    operations are bounded by its deadline, so UNAVAILABLE comes before it, never
    a hang; the watcher's probe times out and health turns NOT_SERVING; resumed,
    the ranker serves again."""
    if own_server.proc is None:
        own_server.start()
    vectors = unit32(np.random.default_rng(5).standard_normal((10, DIM)))
    with ranker(own_server.uri) as proc, proc.channel() as channel:
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        upsert(stub, "hung", [f"h{i}" for i in range(10)], vectors)
        own_server.pause()
        try:
            for call in (lambda: search(stub, "hung", vectors[0], timeout=3),
                         lambda: upsert(stub, "hung", ["late"], vectors[:1], timeout=3),
                         lambda: stub.GetStats(pb.GetStatsRequest(collection="hung"), timeout=3)):
                started = time.monotonic()
                assert code_of(call) == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - started < 3
            to_not_serving = wait_for(lambda: health(proc) == NOT_SERVING, 10, "NOT_SERVING")
        finally:
            own_server.resume()
        to_serving = wait_for(lambda: health(proc) == SERVING, 30, "SERVING again")
        print(f"\nhung Milvus: NOT_SERVING {to_not_serving:.2f}s after the calls; SERVING {to_serving:.2f}s after "
              "it resumed")
        assert search(stub, "hung", vectors[7], 1) == ["h7"]
