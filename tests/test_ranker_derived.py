"""Derived re-ranking data (k-reciprocal neighbourhoods) rebuilt in the
background, through a real ranker process (docs/ranker.md#re-ranking):
writes return at once; a search during a rebuild (held open by the test hook
IMAGESEARCH_RANKER_REBUILD_PAUSE_S) waits for it and answers from the new
data, never from the old; a search whose deadline passes first gets
DEADLINE_EXCEEDED while plain searches go on; a burst of writes makes one
rebuild; GetStats and the metrics show the state; a restart without saved
neighbourhoods builds them when a search asks; a clean stop cancels a
rebuild."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from imagesearch import errors
from testkit import ServiceProcess
from imagesearch.v1 import ranker_pb2 as pb
from imagesearch.v1 import ranker_pb2_grpc
from tests.test_ranker_rerank import (
    DIM,
    FP,
    TIMEOUT,
    check,
    clustered,
    ref_k_reciprocal,
    ref_plain,
    search,
    unit64,
    upsert,
)
from tests.test_service_metrics import metrics_url, scrape

PAUSE_S = 3.0  # the hook: a rebuild sleeps this long after each chunk (one chunk here: 120 vectors)
DERIVED_LOG = "derived k-reciprocal k1=20 k2=6 for generation"
KR = {"k_reciprocal": pb.KReciprocalRerank()}


def state(stub, collection) -> pb.DerivedData:
    (stats,) = stub.GetStats(pb.GetStatsRequest(collection=collection), timeout=TIMEOUT).collections
    return stats.derived_data


def wait_state(stub, collection, want, timeout=TIMEOUT) -> pb.DerivedData:
    deadline = time.monotonic() + timeout
    while (d := state(stub, collection)).state != want:
        assert time.monotonic() < deadline, d
        time.sleep(0.05)
    return d


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


@pytest.fixture()
def data():
    rng = np.random.default_rng(7)
    G = clustered(rng)
    names = [f"g{i:03d}" for i in range(len(G))]
    queries = [unit64(rng.standard_normal(DIM)) for _ in range(3)]
    return G, names, queries, rng


def test_search_waits_for_the_rebuild_and_never_sees_old_data(tmp_path, data):
    """A write returns while the rebuild is held open; GetStats says so;
    k-reciprocal searches started after the write wait, then equal the
    reference over the new vectors (a deleted name never comes back, a
    replaced one ranks by its new vector); one with a short deadline gets
    DEADLINE_EXCEEDED, and meanwhile plain searches on another collection
    answer at once, though waiters (Search and SearchStream) outnumber the pool threads."""
    G, names, queries, rng = data
    env = {"IMAGESEARCH_LOG_LEVEL": "INFO", "IMAGESEARCH_RANKER_REBUILD_PAUSE_S": str(PAUSE_S)}
    with ServiceProcess("ranker_service", "--db", str(tmp_path / "d.db"), "--max-workers", "2", env=env) as ranker:
        stub = ranker_pb2_grpc.RankerServiceStub(ranker.channel())
        upsert(stub, "kr", names, G)
        upsert(stub, "plain", names, G)
        assert state(stub, "kr").state == pb.DERIVED_STATE_UNSPECIFIED  # nothing asked for yet
        check(search(stub, "kr", queries[0], **KR), ref_k_reciprocal(G, names, queries[0], 10), 1e-5)
        assert state(stub, "kr").state == pb.DERIVED_STATE_CURRENT  # wanted from now on
        assert state(stub, "kr").kinds == ["k-reciprocal k1=20 k2=6"]

        # a write: delete 10, replace 10; it returns before the (>= 3 s) rebuild ends
        new = clustered(rng, clusters=1, per=10)
        for collection in ("kr", "plain"):
            _, took_delete = timed(stub.Delete, pb.DeleteRequest(collection=collection, names=names[:10]),
                                   timeout=TIMEOUT)
            _, took_upsert = timed(upsert, stub, collection, names[10:20], new)
            assert max(took_delete, took_upsert) < PAUSE_S, (took_delete, took_upsert)
        live = G.copy()
        live[10:20] = new
        live, live_names = live[10:], names[10:]
        assert state(stub, "kr").state in (pb.DERIVED_STATE_STALE, pb.DERIVED_STATE_REBUILDING)

        # a short deadline: DEADLINE_EXCEEDED; the rebuild goes on
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Search(pb.SearchRequest(collection="kr", vector=queries[0], top_k=10, **KR), timeout=0.5))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        # waiters on every pool thread's worth of searches; plain searches still answer at once
        answers: dict[int, object] = {}

        def wait_search(i):
            q = queries[i % len(queries)]
            try:
                if i == 3:  # SearchStream: its batch waits too
                    (r,) = stub.SearchStream(iter([pb.SearchStreamRequest(id="s", collection="kr", vector=q,
                                                                          top_k=10, **KR)]), timeout=TIMEOUT)
                    assert not r.HasField("error"), r.error
                    answers[i] = [m.name for m in r.matches], [m.score for m in r.matches]
                else:
                    answers[i] = search(stub, "kr", q, **KR)
            except grpc.RpcError as exc:
                answers[i] = exc

        waiters = [threading.Thread(target=wait_search, args=(i,)) for i in range(4)]
        for t in waiters:
            t.start()
        time.sleep(0.3)
        got, took = timed(search, stub, "plain", queries[1])
        assert got[0] == ref_plain(live, live_names, queries[1], 10)[0]
        assert took < 1.0, took
        reb = state(stub, "kr")
        assert reb.state == pb.DERIVED_STATE_REBUILDING and reb.building_since > 0, reb
        assert reb.built_generation < reb.generation
        for t in waiters:
            t.join(TIMEOUT)
        for i in range(4):
            assert not isinstance(answers[i], Exception), answers[i]
            check(answers[i], ref_k_reciprocal(live, live_names, queries[i % len(queries)], 10), 1e-5)
            assert not set(answers[i][0]) & set(names[:10])

        done = wait_state(stub, "kr", pb.DERIVED_STATE_CURRENT)
        assert done.built_generation == done.generation and done.last_build_seconds >= PAUSE_S * 0.9, done
        got, took = timed(search, stub, "kr", unit64(new[0]), **KR)
        check(got, ref_k_reciprocal(live, live_names, unit64(new[0]), 10), 1e-5)
        assert took < 1.0, took  # current now: no wait
    assert ranker.proc.returncode == 0, ranker.output


def test_burst_of_writes_makes_one_rebuild_and_a_restart_rebuilds(tmp_path, data):
    """20 Upsert calls in a row (writes pausing less than the debounce) make
    one rebuild; GetStats and the metrics show the state; a restart without
    saved neighbourhoods builds them when a search asks; a clean stop cancels
    a rebuild held open far longer than the stop takes."""
    G, names, queries, _ = data
    db = str(tmp_path / "b.db")
    env = {"IMAGESEARCH_LOG_LEVEL": "INFO", "IMAGESEARCH_RANKER_DERIVED_DEBOUNCE_S": "1.5"}
    with ServiceProcess("ranker_service", "--db", db, "--metrics-port", "0", env=env) as ranker:
        stub = ranker_pb2_grpc.RankerServiceStub(ranker.channel())
        upsert(stub, "kr", names[:6], G[:6])
        search(stub, "kr", queries[0], **KR)  # k-reciprocal wanted from now on
        before = ranker.output.count(DERIVED_LOG)
        for start in range(6, len(names), 6):
            upsert(stub, "kr", names[start:start + 6], G[start:start + 6])
        wait_state(stub, "kr", pb.DERIVED_STATE_CURRENT)
        assert ranker.output.count(DERIVED_LOG) - before == 1, ranker.output
        check(search(stub, "kr", queries[0], **KR), ref_k_reciprocal(G, names, queries[0], 10), 1e-5)
        assert ranker.output.count(DERIVED_LOG) - before == 1  # the search used it, built nothing
        upsert(stub, "plain", names[:5], G[:5])
        metrics = scrape(metrics_url(ranker))
        assert metrics[("imagesearch_ranker_derived_current", (("collection", "kr"),))] == 1.0, metrics
        assert metrics[("imagesearch_ranker_derived_rebuilding", (("collection", "kr"),))] == 0.0
        assert metrics[("imagesearch_ranker_derived_build_seconds", (("collection", "kr"),))] > 0
        assert ("imagesearch_ranker_derived_current", (("collection", "plain"),)) not in metrics  # nothing derived
    assert ranker.proc.returncode == 0, ranker.output

    # The clean stop saved the neighbourhoods (test_ranker_rerank: the next start serves them);
    # without them a restart builds them when a search asks.
    saved = list((tmp_path / "b.db.index").glob("*.kr-*"))
    assert len(saved) == 3
    for f in saved:
        f.unlink()
    pause = {**env, "IMAGESEARCH_RANKER_REBUILD_PAUSE_S": "30"}
    with ServiceProcess("ranker_service", "--db", db, "--grace", "30", env=pause) as ranker:
        stub = ranker_pb2_grpc.RankerServiceStub(ranker.channel())
        assert state(stub, "kr").state == pb.DERIVED_STATE_UNSPECIFIED
        # the first k-reciprocal search starts the build and waits; GetStats says why
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Search(pb.SearchRequest(collection="kr", vector=queries[0], top_k=10, **KR), timeout=1.0))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_state(stub, "kr", pb.DERIVED_STATE_REBUILDING).kinds == ["k-reciprocal k1=20 k2=6"]
        waiting: list = []

        def wait_search():
            try:
                waiting.append(search(stub, "kr", queries[0], **KR))
            except grpc.RpcError as exc:
                waiting.append(exc)

        waiter = threading.Thread(target=wait_search)
        waiter.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        # SIGTERM: the rebuild's 30 s pause is cancelled, and the waiting search ends UNAVAILABLE at
        # once instead of holding the drain for its 30 s grace
        assert ranker.terminate() == 0, ranker.output
        assert time.monotonic() - t0 < 15, ranker.output
        waiter.join(TIMEOUT)
        assert isinstance(waiting[0], grpc.RpcError), waiting
        assert waiting[0].code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in waiting[0].details()
        assert DERIVED_LOG not in ranker.output

    with ServiceProcess("ranker_service", "--db", db, env=env) as ranker:
        stub = ranker_pb2_grpc.RankerServiceStub(ranker.channel())
        check(search(stub, "kr", queries[1], **KR), ref_k_reciprocal(G, names, queries[1], 10), 1e-5)
        assert ranker.output.count(DERIVED_LOG) == 1, ranker.output
    assert ranker.proc.returncode == 0, ranker.output


def test_core_wait_names_the_rebuild_when_the_deadline_passes(tmp_path, monkeypatch):
    """In the core: a search whose deadline has passed while the derived data
    is stale gets DeadlineExceeded (DEADLINE_EXCEEDED) naming the collection
    and what is being rebuilt; nothing is built by the search."""
    from ranker_service.memory import background
    from ranker_service.sqlite.backend import SqliteBackend
    from ranker_service.sqlite.store import Store
    from ranker_service.types import Query, UpsertItem
    from ranker_service.validation import make_k_reciprocal

    monkeypatch.setattr(background, "PAUSE_S", 1.0)
    gallery = SqliteBackend(Store.open(tmp_path / "c.db"))
    gallery.load()
    try:
        rng = np.random.default_rng(3)
        G = clustered(rng)
        names = [f"n{i}" for i in range(len(G))]
        gallery.upsert(UpsertItem("c", name, v, FP) for name, v in zip(names, G))
        options = make_k_reciprocal()
        with pytest.raises(errors.DeadlineExceeded, match=r"collection 'c': its derived re-ranking data "
                                                          r"\(k-reciprocal k1=20 k2=6\) is being rebuilt") as info:
            gallery.search(Query("c", G[0], 5, k_reciprocal=options, deadline=time.monotonic() + 0.2))
        assert info.value.status == "DEADLINE_EXCEEDED"
        found = gallery.search(Query("c", G[0], 5, k_reciprocal=options, deadline=time.monotonic() + TIMEOUT))
        assert [m.name for m in found] == ref_k_reciprocal(G, names, unit64(G[0]), 5)[0]
    finally:
        gallery.close()
