"""The ranker's backend-agnostic tests: the same RankerService contract over
every backend (`--backend sqlite`; `--backend milvus` on an embedded
milvus-lite file, and on a real Milvus standalone server, the session's
`milvus_server`), each against a real `python -m ranker_service` process.

Backend-agnostic tests in this module (run once per backend):
- test_results_equal_float64_numpy_top_k
- test_search_stream_equals_search
- test_status_codes
- test_deletes
- test_replacement
- test_create_get_stats_and_drop_collection
- test_persistence_across_a_restart
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from testkit import ServiceProcess, reference_ranking, unit32
from imagesearch.v1 import ranker_pb2 as pb
from imagesearch.v1 import ranker_pb2_grpc

BACKENDS = ["sqlite", "milvus", "milvus-server"]
DIM = 24
N = 300
FP = "sha256:model-b"
TIMEOUT = 60


def backend_args(backend: str, folder, request) -> list[str]:
    """The ranker's flags for a backend, its data kept by `folder` (a SQLite file,
    a milvus-lite file, or a database of its own on the shared Milvus server)."""
    if backend == "milvus":
        pytest.importorskip("milvus_lite", reason="milvus-lite is not installed")
        return ["--backend", "milvus", "--milvus-uri", str(folder / "milvus.db")]
    if backend == "milvus-server":
        server = request.getfixturevalue("milvus_server")
        return ["--backend", "milvus", "--milvus-uri", server.database_uri(folder)]
    return ["--db", str(folder / "gallery.db")]


def start(backend: str, folder, request) -> ServiceProcess:
    return ServiceProcess("ranker_service", *backend_args(backend, folder, request), "--batch-size", "64",
                          startup_timeout=120)


def upsert(stub, collection, names, vectors, fingerprint=FP):
    return stub.Upsert(iter([pb.UpsertRequest(collection=collection, name=n, vector=v, fingerprint=fingerprint)
                             for n, v in zip(names, vectors)]), timeout=TIMEOUT)


def search(stub, collection, vector, top_k=0, fingerprint=""):
    return [r.match for r in stub.Search(pb.SearchRequest(collection=collection, vector=vector, top_k=top_k,
                                                          fingerprint=fingerprint), timeout=TIMEOUT)]


@pytest.fixture(scope="module", params=BACKENDS)
def ranker(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"ranker-{request.param}")
    proc = start(request.param, folder, request)
    proc.backend, proc.folder = request.param, folder
    yield proc
    assert proc.terminate() == 0, proc.output


@pytest.fixture(scope="module")
def stub(ranker):
    channel = ranker.channel()
    yield ranker_pb2_grpc.RankerServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def gallery(stub):
    rng = np.random.default_rng(7)
    raw = rng.standard_normal((N, DIM)).astype(np.float32)
    raw[5] = raw[4]  # an exact tie, broken by name
    names = [f"g/{i:04d}.jpg" for i in rng.permutation(N)]
    result = upsert(stub, "gallery", names, raw)
    assert (result.upserted, result.inserted, result.replaced) == (N, N, 0)
    return unit32(raw), names


def test_results_equal_float64_numpy_top_k(stub, gallery):
    matrix, names = gallery
    rng = np.random.default_rng(1)
    queries = [*rng.standard_normal((4, DIM)).astype(np.float32), matrix[4]]
    for query in queries:
        for k in (1, 10, 50):
            matches = search(stub, "gallery", query, k, fingerprint=FP)
            want_names, want_scores = reference_ranking(matrix, names, query, k)
            assert [m.name for m in matches] == want_names
            assert [m.rank for m in matches] == list(range(1, k + 1))
            np.testing.assert_allclose([m.score for m in matches], want_scores, atol=1e-6)


def test_search_stream_equals_search(stub, gallery):
    matrix, names = gallery
    queries = np.random.default_rng(2).standard_normal((20, DIM)).astype(np.float32)
    answers = list(stub.SearchStream(iter(
        [pb.SearchStreamRequest(id=f"q{i}", collection="gallery", vector=q, top_k=5) for i, q in enumerate(queries)]
        + [pb.SearchStreamRequest(id="bad", collection="nope", vector=queries[0])]), timeout=TIMEOUT))
    by_id = {a.id: a for a in answers}
    for i, q in enumerate(queries):
        assert [m.name for m in by_id[f"q{i}"].matches] == reference_ranking(matrix, names, q, 5)[0]
    assert by_id["bad"].error.code == grpc.StatusCode.NOT_FOUND.value[0]


@pytest.mark.parametrize("request_,code,text", [
    (pb.SearchRequest(collection="gallery", vector=[1.0] * DIM, top_k=1001), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    (pb.SearchRequest(collection="missing", vector=[1.0] * DIM), grpc.StatusCode.NOT_FOUND, "unknown collection"),
    (pb.SearchRequest(collection="gallery", vector=[1.0] * DIM, fingerprint="other"),
     grpc.StatusCode.FAILED_PRECONDITION, "fingerprint"),
    (pb.SearchRequest(collection="gallery", vector=[1.0] * (DIM + 1)), grpc.StatusCode.INVALID_ARGUMENT, "dimension"),
    (pb.SearchRequest(collection="gallery", vector=[float("nan")] * DIM), grpc.StatusCode.INVALID_ARGUMENT, "finite"),
    (pb.SearchRequest(collection="gallery", vector=[0.0] * DIM), grpc.StatusCode.INVALID_ARGUMENT, "all-zero"),
])
def test_status_codes(stub, gallery, request_, code, text):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Search(request_, timeout=TIMEOUT))
    assert info.value.code() == code and text in info.value.details()


def test_upsert_status_codes_name_the_item(stub, gallery):
    for item, code in ((pb.UpsertRequest(collection="gallery", name="", vector=[1.0] * DIM, fingerprint=FP),
                        grpc.StatusCode.INVALID_ARGUMENT),
                       (pb.UpsertRequest(collection="gallery", name="x", vector=[1.0] * DIM, fingerprint="other"),
                        grpc.StatusCode.FAILED_PRECONDITION),
                       (pb.UpsertRequest(collection="gallery", name="x", vector=[1.0] * 3, fingerprint=FP),
                        grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as info:
            stub.Upsert(iter([item]), timeout=TIMEOUT)
        assert info.value.code() == code and "item 0" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Delete(pb.DeleteRequest(collection="missing", names=["a"]), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_deletes(stub):
    vectors = unit32(np.random.default_rng(3).standard_normal((40, DIM)))
    names = [f"d{i:02d}" for i in range(40)]
    upsert(stub, "deletes", names, vectors)
    response = stub.Delete(pb.DeleteRequest(collection="deletes", names=names[:10] + ["absent", names[0]]),
                           timeout=TIMEOUT)
    assert response.deleted == 10 and list(response.not_found) == ["absent"]
    for j in range(10):  # a deleted vector, as the query, is not found
        found = [m.name for m in search(stub, "deletes", vectors[j], 40)]
        assert not set(found) & set(names[:10]) and len(found) == 30
    (stats,) = stub.GetStats(pb.GetStatsRequest(collection="deletes"), timeout=TIMEOUT).collections
    assert stats.count == 30


def test_replacement(stub):
    rng = np.random.default_rng(4)
    old, new = unit32(rng.standard_normal((2, 20, DIM)))
    names = [f"r{i:02d}" for i in range(20)]
    upsert(stub, "replace", names, old)
    result = upsert(stub, "replace", names[:10] + ["extra"], [*new[:10], new[10]])
    assert (result.upserted, result.inserted, result.replaced) == (11, 1, 10)
    current = np.concatenate([new[:10], old[10:], new[10:11]])
    current_names = names + ["extra"]
    for j in range(10):
        assert [m.name for m in search(stub, "replace", old[j], 21)] == reference_ranking(current, current_names, old[j], 21)[0]
        (top,) = search(stub, "replace", new[j], 1)
        assert top.name == names[j] and top.score == pytest.approx(1.0, abs=1e-6)


def test_create_get_stats_and_drop_collection(stub):
    options = pb.IndexOptions(kind=pb.INDEX_KIND_HNSW, hnsw_m=16, ef_search=64)
    response = stub.CreateCollection(pb.CreateCollectionRequest(collection="made", dim=DIM, fingerprint=FP,
                                                                index=options), timeout=TIMEOUT)
    assert response.created and response.collection.count == 0
    assert response.collection.index.kind == pb.INDEX_KIND_HNSW and response.collection.index.hnsw_m == 16
    again = stub.CreateCollection(pb.CreateCollectionRequest(collection="made", dim=DIM, fingerprint=FP,
                                                             index=options), timeout=TIMEOUT)
    assert not again.created
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateCollection(pb.CreateCollectionRequest(collection="made", dim=DIM + 1, fingerprint=FP,
                                                         index=options), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateCollection(pb.CreateCollectionRequest(
            collection="bad", dim=DIM, index=pb.IndexOptions(kind=pb.INDEX_KIND_HNSW, hnsw_m=1000)), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hnsw_m" in info.value.details()
    vectors = unit32(np.random.default_rng(5).standard_normal((30, DIM)))
    upsert(stub, "made", [f"m{i}" for i in range(30)], vectors)
    (top,) = search(stub, "made", vectors[3], 1)
    assert top.name == "m3"
    stats = {s.name: s for s in stub.GetStats(pb.GetStatsRequest(), timeout=TIMEOUT).collections}
    assert stats["made"].count == 30 and stats["made"].index.kind == pb.INDEX_KIND_HNSW
    assert stats["gallery"].index.kind == pb.INDEX_KIND_EXACT  # implicit creation: exact
    assert stub.DropCollection(pb.DropCollectionRequest(collection="made"), timeout=TIMEOUT).deleted == 30
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Search(pb.SearchRequest(collection="made", vector=vectors[0]), timeout=TIMEOUT))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        stub.DropCollection(pb.DropCollectionRequest(collection="made"), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("backend", BACKENDS)
def test_persistence_across_a_restart(backend, tmp_path, request):
    vectors = unit32(np.random.default_rng(6).standard_normal((50, DIM)))
    names = [f"p{i:02d}" for i in range(50)]
    with start(backend, tmp_path, request) as first:
        stub = ranker_pb2_grpc.RankerServiceStub(first.channel())
        upsert(stub, "kept", names, vectors)
        stub.Delete(pb.DeleteRequest(collection="kept", names=names[:5]), timeout=TIMEOUT)
        upsert(stub, "kept", [names[5]], [vectors[6]])  # replaced
    assert first.proc.returncode == 0, first.output
    current, current_names = np.concatenate([vectors[6:7], vectors[6:]]), names[5:]
    with start(backend, tmp_path, request) as again:
        stub = ranker_pb2_grpc.RankerServiceStub(again.channel())
        (stats,) = stub.GetStats(pb.GetStatsRequest(collection="kept"), timeout=TIMEOUT).collections
        assert stats.count == 45 and stats.fingerprint == FP and stats.dim == DIM
        for q in vectors[:8]:
            assert [m.name for m in search(stub, "kept", q, 10)] == reference_ranking(current, current_names, q, 10)[0]
