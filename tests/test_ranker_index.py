"""The ranker's in-memory core alone: ranking against a float64 reference,
tie-breaking, the matrix's growth/compaction, validation and concurrency."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagesearch import errors
from testkit import reference_ranking, unit32
from ranker_service import topk as ranking
from ranker_service.memory.exact import MIN_GROWTH_ROWS
from ranker_service.memory.exact import ExactCollection
from ranker_service.memory.registry import Registry
from ranker_service.memory.rwlock import ReadWriteLock
from ranker_service.types import Query
from ranker_service.validation import MAX_TOP_K, check_collection, check_name, unit_vector


def make_index(matrix32, names, collection="c", fingerprint="fp"):
    index = Registry()
    index.upsert(collection, names, matrix32, fingerprint)
    return index


# ---------------------------------------------------------------- ranking


@pytest.mark.parametrize("n,dim,k", [(1, 8, 10), (50, 16, 10), (2000, 1280, 10), (3000, 64, 1000), (700, 32, 700)])
def test_search_matches_float64_reference(n, dim, k):
    rng = np.random.default_rng(n + dim + k)
    matrix = unit32(rng.standard_normal((n, dim)))
    names = [f"img-{i:05d}.jpg" for i in rng.permutation(n)]
    index = make_index(matrix, names)
    for _ in range(5):
        query = rng.standard_normal(dim).astype(np.float32)
        got = index.search(Query("c", query, k))
        want_names, want_scores = reference_ranking(matrix, names, query, k)
        assert [m.name for m in got] == want_names
        assert [m.rank for m in got] == list(range(1, len(want_names) + 1))
        np.testing.assert_allclose([m.score for m in got], want_scores, rtol=0, atol=1e-12)


def test_exact_ties_are_broken_by_name_including_at_the_kth_boundary():
    # Distinct vectors with the same score 1/sqrt(2) for the query e0.
    names = ["z", "d", "b", "c", "a", "far"]
    matrix = unit32([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [1, -1, 0, 0], [0, 1, 0, 0]])
    index = make_index(matrix, names)
    query = [1.0, 0, 0, 0]
    for k, want in [(1, ["z"]), (2, ["z", "a"]), (3, ["z", "a", "b"]), (5, ["z", "a", "b", "c", "d"]),
                    (6, ["z", "a", "b", "c", "d", "far"])]:
        assert [m.name for m in index.search(Query("c", query, k))] == want
        assert reference_ranking(matrix, names, query, k)[0] == want


def test_near_ties_follow_float64_not_float32():
    # Two rows one float32 ulp apart: their float32 scores may tie or swap;
    # the float64 ranking puts the better one ('b') first despite its name.
    rng = np.random.default_rng(7)
    dim = 1280
    query = rng.standard_normal(dim)
    a = unit32(query + rng.standard_normal(dim))  # close to the query: 'a' and 'b' are the top 2
    b = a.copy()
    i = int(np.argmax(np.abs(query)))
    b[i] = np.nextafter(b[i], np.float32(np.inf) if query[i] > 0 else np.float32(-np.inf))
    names = ["a", "b"] + [f"x{j}" for j in range(200)]
    matrix = np.vstack([a, b, unit32(rng.standard_normal((200, dim)))])
    index = make_index(matrix, names)
    got = [m.name for m in index.search(Query("c", query, 2))]
    assert got == reference_ranking(matrix, names, query, 2)[0] == ["b", "a"]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_property_same_ranking_as_reference_with_many_exact_ties(data):
    dim = data.draw(st.integers(2, 6))
    n = data.draw(st.integers(1, 40))
    k = data.draw(st.integers(1, 50))
    rows = data.draw(st.lists(st.lists(st.integers(-1, 1), min_size=dim, max_size=dim)
                              .filter(lambda r: any(r)), min_size=n, max_size=n))
    query = data.draw(st.lists(st.integers(-2, 2), min_size=dim, max_size=dim).filter(lambda r: any(r)))
    names = data.draw(st.lists(st.text("abcxyz", min_size=1, max_size=3), min_size=n, max_size=n, unique=True))
    matrix = unit32(rows)
    index = make_index(matrix, names)
    got = index.search(Query("c", query, k))
    assert [m.name for m in got] == reference_ranking(matrix, names, query, k, rowwise=True)[0]


def test_score_margin_bounds_float32_error():
    rng = np.random.default_rng(3)
    for dim in (8, 256, 1280):
        matrix = unit32(rng.standard_normal((500, dim)))
        q64 = unit_vector(rng.standard_normal(dim), what="q")
        s32 = matrix @ q64.astype(np.float32)
        s64 = matrix.astype(np.float64) @ q64
        assert np.abs(s32 - s64).max() <= ranking.score_margin(dim) / 2


# ---------------------------------------------------------------- collection memory


def test_collection_upsert_replace_delete_keep_rows_names_consistent():
    rng = np.random.default_rng(1)
    coll = ExactCollection("c", 8, "fp")
    vecs = unit32(rng.standard_normal((300, 8)))
    names = [f"n{i}" for i in range(300)]
    assert coll.upsert(names, vecs) == (300, 0)
    # Last repeated name wins; replaced names keep one row.
    new = unit32(rng.standard_normal((3, 8)))
    assert coll.upsert(["n5", "n5", "extra"], new) == (1, 2)
    assert len(coll) == 301
    np.testing.assert_array_equal(coll.vector("n5"), new[1])
    np.testing.assert_array_equal(coll.vector("extra"), new[2])
    removed = coll.delete(["n0", "n299", "missing", "n0", "extra"])
    assert removed == ["n0", "n299", "extra"]
    assert len(coll) == 298
    matrix, got_names = coll.snapshot()
    assert sorted(got_names) == sorted(set(names) - {"n0", "n299"})
    expected = {n: vecs[i] for i, n in enumerate(names)}
    expected["n5"] = new[1]
    for row, name in zip(matrix, got_names):
        np.testing.assert_array_equal(row, expected[name])


def test_growth_is_amortised_with_small_slack_and_shrinks_after_deletes():
    coll = ExactCollection("c", 4, "")
    rng = np.random.default_rng(2)
    reallocations = 0
    last_capacity = coll.capacity
    for start in range(0, 20000, 100):
        coll.upsert([f"n{i}" for i in range(start, start + 100)], unit32(rng.standard_normal((100, 4))))
        if coll.capacity != last_capacity:
            reallocations += 1
            last_capacity = coll.capacity
        slack = coll.capacity - len(coll)
        assert slack <= max(MIN_GROWTH_ROWS, len(coll) // 16) + 100
    assert reallocations < 60  # geometric growth, not one rebuild per write (200 writes)
    coll.delete([f"n{i}" for i in range(15000)])
    assert len(coll) == 5000
    assert coll.capacity <= 5000 + max(MIN_GROWTH_ROWS, 5000 // 8)
    assert sorted(coll.names()) == sorted(f"n{i}" for i in range(15000, 20000))


def test_memory_bytes_counts_matrix_and_names():
    coll = ExactCollection("c", 1280, "")
    coll.upsert([f"img{i}" for i in range(1000)], unit32(np.ones((1000, 1280))))
    mem = coll.memory_bytes()
    assert mem >= coll.capacity * 1280 * 4
    assert mem <= 1.15 * 1000 * 1280 * 4


# ---------------------------------------------------------------- validation


@pytest.fixture
def index():
    rng = np.random.default_rng(0)
    return make_index(unit32(rng.standard_normal((20, 8))), [f"n{i}" for i in range(20)])


@pytest.mark.parametrize("query,error,text", [
    (Query("c", [1.0] * 7), errors.InvalidArgument, "7 values, expected dimension 8"),
    (Query("c", [1.0] * 7 + [float("nan")]), errors.InvalidArgument, "vector[7] is nan"),
    (Query("c", [float("inf")] + [1.0] * 7), errors.InvalidArgument, "vector[0] is inf"),
    (Query("c", [0.0] * 8), errors.InvalidArgument, "all-zero"),
    (Query("c", []), errors.InvalidArgument, "empty vector"),
    (Query("c", [1.0] * 8, top_k=MAX_TOP_K + 1), errors.InvalidArgument, "top_k 1001 is out of range"),
    (Query("", [1.0] * 8), errors.InvalidArgument, "empty collection name"),
    (Query("x" * 200, [1.0] * 8), errors.InvalidArgument, "at most 128"),
    (Query("nope", [1.0] * 8), errors.NotFound, "unknown collection 'nope'"),
    (Query("c", [1.0] * 8, fingerprint="other"), errors.FailedPrecondition, "differs from collection 'c'"),
])
def test_invalid_queries_raise_domain_errors(index, query, error, text):
    with pytest.raises(error) as info:
        index.search(query)
    assert text in str(info.value)


def test_default_top_k_empty_fingerprint_and_tiny_vectors(index):
    assert len(index.search(Query("c", [1.0] * 8))) == 10
    assert len(index.search(Query("c", [1.0] * 8, fingerprint="fp", top_k=3))) == 3
    # Denormal float32 values are fine: normalisation is done in float64.
    assert len(index.search(Query("c", [1e-45] * 8, top_k=1))) == 1


def test_empty_collection_gives_no_matches(index):
    index.get("c").delete([f"n{i}" for i in range(20)])
    assert index.search(Query("c", [1.0] * 8)) == []


def test_search_many_batches_and_isolates_bad_queries(index):
    rng = np.random.default_rng(5)
    other = unit32(rng.standard_normal((10, 3)))
    index.upsert("d", [f"d{i}" for i in range(10)], other)
    queries = [Query("c", rng.standard_normal(8), 5, id="a"), Query("nope", [1.0] * 8, id="b"),
               Query("d", rng.standard_normal(3), 0, id="c"), Query("c", [np.nan] * 8, id="d"),
               Query("c", rng.standard_normal(8), 20, id="e")]
    results = index.search_many(queries)
    assert isinstance(results[1], errors.NotFound) and "unknown collection" in str(results[1])
    assert isinstance(results[3], errors.InvalidArgument) and "query 'd'" in str(results[3])
    for i in (0, 2, 4):
        assert results[i] == index.search(queries[i])


def test_name_rules():
    with pytest.raises(errors.InvalidArgument, match="empty name"):
        check_name("", what="item 0")
    with pytest.raises(errors.InvalidArgument, match="NUL"):
        check_name("a\x00b", what="item 0")
    with pytest.raises(errors.InvalidArgument, match="control characters"):
        check_collection("a\nb")
    with pytest.raises(errors.InvalidArgument, match="blank"):
        check_collection("   ")
    assert check_name("sub/dir/é.jpg", what="x") == "sub/dir/é.jpg"


# ---------------------------------------------------------------- concurrency


def test_searches_never_see_half_written_rows():
    """A writer flips 'x' between two orthogonal vectors, appends rows (the
    matrix grows) and deletes rows (compaction moves rows and names) while
    readers search: every returned score must be exactly the score of the
    vector that name holds (1 or 0 for 'x'), never a torn row or a name
    paired with another row."""
    dim = 2048
    rng = np.random.default_rng(11)
    coll = ExactCollection("c", dim, "")
    a = np.zeros(dim)
    a[: dim // 2] = 1
    b = np.zeros(dim)
    b[dim // 2:] = 1
    a, b = unit32(a), unit32(b)
    q64 = a.astype(np.float64) / np.linalg.norm(a.astype(np.float64))
    coll.upsert(["x"], a[None])
    fillers = unit32(rng.standard_normal((4000, dim)))
    expected = {f"f{i}": float(s) for i, s in enumerate(ranking.exact_scores(fillers, q64))}
    stop = threading.Event()
    failures = []

    def reader():
        try:
            while not stop.is_set():
                (found,) = coll.search(q64[None], [25])
                for name, score in found:
                    if name == "x":
                        if not (abs(score - 1) < 1e-6 or abs(score) < 1e-6):
                            failures.append(("x", score))
                    elif abs(score - expected[name]) > 1e-12:
                        failures.append((name, score, expected[name]))
                if [s for _, s in found] != sorted((s for _, s in found), reverse=True):
                    failures.append(found)
        except Exception as exc:  # an inconsistent matrix/names pair may also raise
            failures.append(repr(exc))

    def writer():
        i = 0
        while not stop.is_set() and i < 4000 // 40:
            coll.upsert(["x"], (b if i % 2 else a)[None])
            coll.upsert([f"f{j}" for j in range(i * 40, i * 40 + 40)], fillers[i * 40:i * 40 + 40])
            if i % 3 == 2:
                coll.delete([f"f{j}" for j in range((i - 1) * 40, (i - 1) * 40 + 40)])
            i += 1

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    threads[-1].join(60)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert len(coll) > 2000


def test_rwlock_excludes_writers_and_prefers_them():
    lock = ReadWriteLock()
    events = []
    with lock.read():
        writer_started = threading.Event()

        def writer():
            writer_started.set()
            with lock.write():
                events.append("write")

        def late_reader():
            with lock.read():
                events.append("late read")

        tw = threading.Thread(target=writer)
        tw.start()
        writer_started.wait()
        deadline = time.monotonic() + 10
        while lock._writers_waiting == 0 and time.monotonic() < deadline:  # the writer now waits for us
            time.sleep(0.01)
        assert lock._writers_waiting == 1
        tr = threading.Thread(target=late_reader)
        tr.start()
        time.sleep(0.1)
        assert events == []  # neither the writer (we read) nor the late reader (a writer waits)
    tw.join(5)
    tr.join(5)
    assert events == ["write", "late read"]
