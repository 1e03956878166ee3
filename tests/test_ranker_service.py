"""RankerService as a real process (`python -m ranker_service`) on a real
SQLite file, over real channels: results, status codes, stats, health,
reflection, start-up failures, a full database and graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from imagesearch import serving
from testkit import ServiceProcess, reference_ranking, unit32
from imagesearch.v1 import ranker_pb2 as pb
from imagesearch.v1 import ranker_pb2_grpc
from ranker_service.servicer import SERVICE_NAME
from tests.test_ranker_store import make_read_only

DIM = 48
N = 500
FP = "sha256:model-a"
TIMEOUT = 30


def upsert(stub, collection, names, vectors, fingerprint=FP):
    return stub.Upsert(iter([pb.UpsertRequest(collection=collection, name=n, vector=v, fingerprint=fingerprint)
                             for n, v in zip(names, vectors)]), timeout=TIMEOUT)


def search(stub, collection, vector, top_k=0, fingerprint=""):
    return [r.match for r in stub.Search(pb.SearchRequest(collection=collection, vector=vector, top_k=top_k,
                                                          fingerprint=fingerprint), timeout=TIMEOUT)]


@pytest.fixture(scope="module")
def ranker(tmp_path_factory):
    path = tmp_path_factory.mktemp("ranker") / "gallery.db"
    proc = ServiceProcess("ranker_service", "--db", str(path), "--batch-size", "64", "--max-batch", "32")
    proc.db_path = path
    yield proc
    assert proc.terminate() == 0, proc.output


@pytest.fixture(scope="module")
def channel(ranker):
    ch = ranker.channel()
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel):
    return ranker_pb2_grpc.RankerServiceStub(channel)


@pytest.fixture(scope="module")
def gallery(stub):
    """500 random 48-d vectors in collection 'gallery', names in shuffled order."""
    rng = np.random.default_rng(42)
    raw = rng.standard_normal((N, DIM)).astype(np.float32)
    names = [f"g/{i:04d}.jpg" for i in rng.permutation(N)]
    result = upsert(stub, "gallery", names, raw)
    assert (result.upserted, result.inserted, result.replaced) == (N, N, 0)
    return unit32(raw), names


# ---------------------------------------------------------------- health and reflection


def test_health_is_serving_and_reflection_lists_the_service(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=TIMEOUT)
    names = {s.name for s in answer.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


# ---------------------------------------------------------------- search


@pytest.mark.parametrize("top_k,expected", [(0, 10), (1, 1), (37, 37), (1000, N)])
def test_search_streams_the_float64_reference_ranking(stub, gallery, top_k, expected):
    matrix, names = gallery
    rng = np.random.default_rng(top_k)
    for _ in range(3):
        query = rng.standard_normal(DIM).astype(np.float32)
        matches = search(stub, "gallery", query, top_k, fingerprint=FP)
        want_names, want_scores = reference_ranking(matrix, names, query, expected)
        assert [m.name for m in matches] == want_names
        assert [m.rank for m in matches] == list(range(1, expected + 1))
        np.testing.assert_allclose([m.score for m in matches], want_scores, atol=1e-6)


def test_search_stream_answers_every_query_by_id_and_isolates_bad_ones(stub, gallery):
    matrix, names = gallery
    rng = np.random.default_rng(9)
    queries = rng.standard_normal((150, DIM)).astype(np.float32)
    requests = [pb.SearchStreamRequest(id=f"q{i}", collection="gallery", vector=q, top_k=(i % 20))
                for i, q in enumerate(queries)]
    bad = {
        "wrong-dim": (pb.SearchStreamRequest(id="wrong-dim", collection="gallery", vector=[1.0] * 3),
                      grpc.StatusCode.INVALID_ARGUMENT),
        "nan": (pb.SearchStreamRequest(id="nan", collection="gallery", vector=[float("nan")] * DIM),
                grpc.StatusCode.INVALID_ARGUMENT),
        "top-k": (pb.SearchStreamRequest(id="top-k", collection="gallery", vector=queries[0], top_k=1001),
                  grpc.StatusCode.INVALID_ARGUMENT),
        "unknown": (pb.SearchStreamRequest(id="unknown", collection="nope", vector=queries[0]),
                    grpc.StatusCode.NOT_FOUND),
        "model": (pb.SearchStreamRequest(id="model", collection="gallery", vector=queries[0], fingerprint="other"),
                  grpc.StatusCode.FAILED_PRECONDITION),
    }
    for position, (request, _) in zip((0, 40, 75, 110, 149), bad.values()):
        requests.insert(position, request)
    answers = list(stub.SearchStream(iter(requests), timeout=TIMEOUT))
    assert [a.id for a in answers] == [r.id for r in requests]  # each answered once, in order
    for answer, request in zip(answers, requests):
        if request.id in bad:
            assert answer.error.code == bad[request.id][1].value[0], answer
            assert request.id in answer.error.message and not answer.matches
            continue
        assert not answer.HasField("error")
        k = request.top_k or 10
        assert [m.name for m in answer.matches] == reference_ranking(matrix, names, request.vector, k)[0]


def test_stream_reader_batches_what_has_arrived_up_to_the_cap():
    async def run():
        async def source():
            for i in range(200):
                yield i
        batches = []
        async with serving.StreamReader(source(), ahead=64) as reader:
            await asyncio.sleep(0.05)  # let the reader run ahead
            while batch := await reader.batch(16):
                batches.append(batch)
        return batches

    batches = asyncio.run(run())
    assert [x for b in batches for x in b] == list(range(200))
    assert max(len(b) for b in batches) <= 16
    assert len(batches) < 200  # what had arrived was answered together


def test_stream_reader_stops_reading_when_closed_early():
    async def run():
        async def endless():
            i = 0
            while True:
                yield i
                i += 1
        reader = serving.StreamReader(endless(), ahead=4)
        assert await reader.batch(4) and await reader.batch(4)
        reader.close()  # e.g. the client went away: the reader must not wait forever on a full queue
        await asyncio.sleep(0.05)
        return reader._task.done()

    assert asyncio.run(run())


def test_get_stats(stub, gallery):
    stats = stub.GetStats(pb.GetStatsRequest(collection="gallery"), timeout=TIMEOUT)
    (coll,) = stats.collections
    assert (coll.name, coll.count, coll.dim, coll.fingerprint) == ("gallery", N, DIM, FP)
    assert N * DIM * 4 <= coll.memory_bytes <= 1.5 * N * DIM * 4 + 100_000
    assert coll.created_at <= coll.updated_at
    assert stats.max_top_k == 1000 and stats.memory_bytes == coll.memory_bytes
    everything = stub.GetStats(pb.GetStatsRequest(), timeout=TIMEOUT)
    assert "gallery" in [c.name for c in everything.collections]
    with pytest.raises(grpc.RpcError) as info:
        stub.GetStats(pb.GetStatsRequest(collection="nope"), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- validation


def _search_request(**kw):
    fields = dict(collection="gallery", vector=[1.0] * DIM)
    fields.update(kw)
    return pb.SearchRequest(**fields)


@pytest.mark.parametrize("request_,code,text", [
    (_search_request(vector=[1.0] * (DIM + 1)), grpc.StatusCode.INVALID_ARGUMENT, "expected dimension 48"),
    (_search_request(vector=[1.0] * (DIM - 1) + [float("nan")]), grpc.StatusCode.INVALID_ARGUMENT, "is nan"),
    (_search_request(vector=[float("-inf")] + [1.0] * (DIM - 1)), grpc.StatusCode.INVALID_ARGUMENT, "is -inf"),
    (_search_request(vector=[0.0] * DIM), grpc.StatusCode.INVALID_ARGUMENT, "all-zero"),
    (_search_request(top_k=1001), grpc.StatusCode.INVALID_ARGUMENT, "top_k 1001 is out of range"),
    (_search_request(collection=""), grpc.StatusCode.INVALID_ARGUMENT, "empty collection name"),
    (_search_request(collection="c" * 129), grpc.StatusCode.INVALID_ARGUMENT, "at most 128"),
    (_search_request(collection="nope"), grpc.StatusCode.NOT_FOUND, "unknown collection 'nope'"),
    (_search_request(fingerprint="sha256:model-b"), grpc.StatusCode.FAILED_PRECONDITION, "differs from collection"),
], ids=["dim", "nan", "inf", "zero", "top_k", "no-collection", "long-collection", "unknown", "fingerprint"])
def test_bad_searches_get_status_codes(stub, gallery, request_, code, text):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Search(request_, timeout=TIMEOUT))
    assert info.value.code() == code
    assert text in info.value.details()


@pytest.mark.parametrize("item,code,text", [
    (dict(name="x", vector=[1.0] * 5), grpc.StatusCode.INVALID_ARGUMENT, "has 5 values but collection 'gallery' has dimension 48"),
    (dict(name="x", vector=[float("nan")] * DIM), grpc.StatusCode.INVALID_ARGUMENT, "vector[0] is nan"),
    (dict(name="x", vector=[float("inf")] * DIM), grpc.StatusCode.INVALID_ARGUMENT, "vector[0] is inf"),
    (dict(name="x", vector=[0.0] * DIM), grpc.StatusCode.INVALID_ARGUMENT, "all-zero"),
    (dict(name="", vector=[1.0] * DIM), grpc.StatusCode.INVALID_ARGUMENT, "empty name"),
    (dict(name="x", vector=[1.0] * DIM, fingerprint="sha256:model-b"), grpc.StatusCode.FAILED_PRECONDITION,
     "fingerprint 'sha256:model-b' differs from collection 'gallery'"),
], ids=["dim", "nan", "inf", "zero", "empty-name", "fingerprint"])
def test_bad_upserts_get_status_codes_naming_the_item(stub, gallery, item, code, text):
    fields = dict(collection="gallery", fingerprint=FP)
    fields.update(item)
    with pytest.raises(grpc.RpcError) as info:
        stub.Upsert(iter([pb.UpsertRequest(**fields)]), timeout=TIMEOUT)
    assert info.value.code() == code
    assert text in info.value.details() and "item 0" in info.value.details()


def test_upsert_failing_at_item_n_keeps_what_was_committed(stub):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((150, 8)).astype(np.float32)
    requests = [pb.UpsertRequest(collection="partial", name=f"p{i:03d}", vector=v, fingerprint=FP)
                for i, v in enumerate(vectors)]
    requests[100] = pb.UpsertRequest(collection="partial", name="broken", vector=[1.0] * 7, fingerprint=FP)
    with pytest.raises(grpc.RpcError) as info:
        stub.Upsert(iter(requests), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details()
    assert "item 100 (name 'broken')" in details and "has 7 values" in details
    assert "100 items of this call were committed" in details
    (stats,) = stub.GetStats(pb.GetStatsRequest(collection="partial"), timeout=TIMEOUT).collections
    assert stats.count == 100
    assert search(stub, "partial", vectors[99], 1)[0].name == "p099"


def test_same_name_replaces_and_delete_empties_a_collection(stub):
    first = upsert(stub, "temp", ["a", "b", "c"], [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert (first.inserted, first.replaced) == (3, 0)
    again = upsert(stub, "temp", ["a"], [[0, 0, 2]])
    assert (again.upserted, again.inserted, again.replaced) == (1, 0, 1)
    assert [m.name for m in search(stub, "temp", [0, 0, 1], 2)] == ["a", "c"]  # exact tie: by name
    assert search(stub, "temp", [0, 0, 1], 2)[0].score == pytest.approx(1.0)
    deleted = stub.Delete(pb.DeleteRequest(collection="temp", names=["a", "b", "zz", "c"]), timeout=TIMEOUT)
    assert deleted.deleted == 3 and list(deleted.not_found) == ["zz"]
    assert search(stub, "temp", [0, 0, 1]) == []  # an empty collection: an empty stream
    (answer,) = stub.SearchStream(iter([pb.SearchStreamRequest(id="e", collection="temp", vector=[1, 2, 3])]),
                                  timeout=TIMEOUT)
    assert not answer.matches and not answer.HasField("error")
    (stats,) = stub.GetStats(pb.GetStatsRequest(collection="temp"), timeout=TIMEOUT).collections
    assert (stats.count, stats.dim, stats.fingerprint) == (0, 3, FP)  # keeps its dimension and fingerprint
    with pytest.raises(grpc.RpcError) as info:
        stub.Delete(pb.DeleteRequest(collection="nope", names=["a"]), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_searches_run_while_upserts_commit(stub, gallery):
    matrix, names = gallery
    query = matrix[0]
    want = reference_ranking(matrix, names, query, 5)[0]
    errors_seen = []

    def writer():
        try:
            for start in range(0, 600, 100):
                upsert(stub, "busy", [f"b{i}" for i in range(start, start + 100)],
                       np.random.default_rng(start).standard_normal((100, DIM)).astype(np.float32))
        except grpc.RpcError as exc:  # pragma: no cover - reported below
            errors_seen.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    while t.is_alive():
        assert [m.name for m in search(stub, "gallery", query, 5)] == want
    t.join()
    assert not errors_seen
    (stats,) = stub.GetStats(pb.GetStatsRequest(collection="busy"), timeout=TIMEOUT).collections
    assert stats.count == 600


# ---------------------------------------------------------------- processes: start-up and writes


def _start_fails(*args) -> str:
    with pytest.raises(RuntimeError) as info:
        ServiceProcess("ranker_service", *args, startup_timeout=60)
    message = str(info.value)
    assert "exited with 1" in message, message
    return message


def test_start_refuses_a_db_locked_by_another_ranker(ranker):
    message = _start_fails("--db", str(ranker.db_path), "--busy-timeout", "0.2")
    assert "is locked by another process" in message


def test_start_refuses_a_corrupt_db(tmp_path):
    path = tmp_path / "corrupt.db"
    path.write_bytes(b"\x00garbage, not a database" * 1000)
    assert "is not a SQLite database" in _start_fails("--db", str(path))


def test_start_refuses_a_read_only_db(tmp_path):
    path = tmp_path / "ro.db"
    with ServiceProcess("ranker_service", "--db", str(path)) as proc:
        stub = ranker_pb2_grpc.RankerServiceStub(proc.channel())
        upsert(stub, "c", ["a"], [[1.0, 2.0]])
    undo = make_read_only(path)
    try:
        assert "is read-only" in _start_fails("--db", str(path))
    finally:
        undo()


def test_start_refuses_a_missing_folder(tmp_path):
    assert "does not exist" in _start_fails("--db", str(tmp_path / "missing" / "x.db"))


def test_full_db_during_a_write_is_an_error_status_and_the_db_stays_sound(tmp_path):
    path = tmp_path / "small.db"
    vectors = np.random.default_rng(1).standard_normal((600, 256)).astype(np.float32)
    with ServiceProcess("ranker_service", "--db", str(path), "--max-db-mb", "0.3", "--batch-size", "20") as proc:
        stub = ranker_pb2_grpc.RankerServiceStub(proc.channel())
        with pytest.raises(grpc.RpcError) as info:
            upsert(stub, "c", [f"n{i:03d}" for i in range(600)], vectors)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "database is full" in info.value.details()
        (stats,) = stub.GetStats(pb.GetStatsRequest(), timeout=TIMEOUT).collections
        assert 0 < stats.count < 600
        assert f"{stats.count} items of this call were committed" in info.value.details()
        assert search(stub, "c", vectors[0], 1)[0].name == "n000"  # still serving
    assert proc.proc.returncode == 0 and "closed" in proc.output  # graceful SIGTERM closed the db
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        names = [r[0] for r in conn.execute("SELECT name FROM vectors ORDER BY name")]
        blobs = dict(conn.execute("SELECT name, vector FROM vectors"))
    assert names == [f"n{i:03d}" for i in range(stats.count)]
    for i, name in enumerate(names):
        assert blobs[name] == unit32(vectors[i]).astype("<f4").tobytes()


def test_the_ranker_imports_neither_torch_nor_the_trainer():
    import subprocess
    import sys

    code = ("import sys, ranker_service.__main__, ranker_service.servicer; "
            "bad = {'torch', 'trainer', 'embedder_service', 'clients'} & {m.split('.')[0] for m in sys.modules}; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
