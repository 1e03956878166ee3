"""Fuzzing the ranker's request validators over a real process: random
collections, names, vectors (NaN, Inf, huge, tiny, wrong length), top_k and
fingerprints. The server never crashes, never answers with a NaN score or a
ranking longer than top_k, and each rejection carries the status code that
its input calls for."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testkit import ServiceProcess
from imagesearch.v1 import ranker_pb2, ranker_pb2_grpc

DIM = 8
FP = "fp-fuzz"
SEED_NAMES = [f"g{i}" for i in range(20)]


@pytest.fixture(scope="module")
def ranker(tmp_path_factory):
    proc = ServiceProcess("ranker_service", "--db", tmp_path_factory.mktemp("fuzz") / "f.db")
    with proc.channel() as ch:
        stub = ranker_pb2_grpc.RankerServiceStub(ch)
        rng = np.random.default_rng(1)
        reqs = [ranker_pb2.UpsertRequest(collection="c", name=n, vector=rng.normal(size=DIM).tolist(),
                                         fingerprint=FP) for n in SEED_NAMES]
        assert stub.Upsert(iter(reqs), timeout=10).upserted == len(SEED_NAMES)
        yield proc, stub
    proc.terminate()


floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -0.0, 1e-45, 3.4e38, -3.4e38, 1.0]),
)
vectors = st.one_of(st.lists(floats, min_size=DIM, max_size=DIM), st.lists(floats, max_size=2 * DIM))
collections = st.one_of(st.just("c"), st.just(""), st.text(max_size=200))
fingerprints = st.sampled_from(["", FP, "other-model"])
top_ks = st.one_of(st.integers(0, 1200), st.integers(0, 2**32 - 1))

ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


def _vector_ok(v) -> bool:
    a = np.asarray(v, dtype=np.float32).astype(np.float64)
    return a.size == DIM and bool(np.isfinite(a).all()) and bool(np.any(a != 0))


def _expected_codes(collection, vector, top_k, fingerprint):
    """The codes that this request may rightly get (empty: it must succeed)."""
    codes = set()
    if collection != "c":
        codes.add(grpc.StatusCode.NOT_FOUND)
        codes.add(grpc.StatusCode.INVALID_ARGUMENT)  # a malformed name is rejected before the lookup
    if not _vector_ok(vector) or top_k > 1000:
        codes.add(grpc.StatusCode.INVALID_ARGUMENT)
    if fingerprint not in ("", FP):
        codes.add(grpc.StatusCode.FAILED_PRECONDITION)
    return codes


@FUZZ
@given(collection=collections, vector=vectors, top_k=top_ks, fingerprint=fingerprints)
def test_search_validation(ranker, collection, vector, top_k, fingerprint):
    _, stub = ranker
    req = ranker_pb2.SearchRequest(collection=collection, vector=vector, top_k=top_k, fingerprint=fingerprint)
    expected = _expected_codes(collection, vector, top_k, fingerprint)
    try:
        matches = [r.match for r in stub.Search(req, timeout=10)]
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, exc
        assert exc.code() in expected, (exc.code(), exc.details(), expected)
        assert exc.details()
        return
    assert not expected, f"accepted a request that should fail with {expected}"
    assert len(matches) == min(top_k or 10, len(SEED_NAMES))
    assert all(math.isfinite(m.score) and -1.0001 <= m.score <= 1.0001 for m in matches)
    assert [m.rank for m in matches] == list(range(1, len(matches) + 1))
    assert all(a.score >= b.score for a, b in zip(matches, matches[1:]))


@FUZZ
@given(items=st.lists(st.tuples(st.sampled_from(["c", "", "fz"]), st.text(max_size=40), vectors, fingerprints),
                      min_size=1, max_size=5))
def test_upsert_validation(ranker, items):
    _, stub = ranker
    reqs = [ranker_pb2.UpsertRequest(collection=c, name=n, vector=v, fingerprint=f) for c, n, v, f in items]
    try:
        stub.Upsert(iter(reqs), timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                              grpc.StatusCode.RESOURCE_EXHAUSTED}, (exc.code(), exc.details())
        assert exc.details()


def test_still_answers_correctly_after_fuzzing(ranker):
    proc, stub = ranker
    assert proc.proc.poll() is None, proc.output
    stats = stub.GetStats(ranker_pb2.GetStatsRequest(collection="c"), timeout=5)
    assert stats.collections[0].dim == DIM
    q = np.ones(DIM).tolist()
    got = [r.match.name for r in stub.Search(ranker_pb2.SearchRequest(collection="c", vector=q, top_k=5),
                                             timeout=5)]
    assert len(got) == 5
    for r in stub.Search(ranker_pb2.SearchRequest(collection="c", vector=q, top_k=1000), timeout=5):
        assert math.isfinite(r.match.score)
