"""Index kinds in memory (no SQLite, no gRPC): exact float16, hnsw and ivf_pq
against the float64 reference; deletes and replacements never come back;
rebuilds once the dead share passes the threshold; index files round-trip."""

from __future__ import annotations

import time

import numpy as np
import pytest

from imagesearch import errors
from testkit import reference_ranking, unit32
from ranker_service.memory import faiss as faiss_kind
from ranker_service.memory import faiss_build
from ranker_service.memory.registry import Registry, make_collection
from ranker_service.sqlite import snapshots
from ranker_service.types import IndexSpec, Query
from ranker_service.validation import make_spec, spec_from_json

DIM = 32
N = 3000


def clustered(n: int, seed: int, centres: int = 40) -> np.ndarray:
    """Centres + noise, normalised: data with structure, like photo embeddings."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, DIM))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    noise = rng.standard_normal((n, DIM))
    noise *= 0.5 / np.linalg.norm(noise, axis=1, keepdims=True)
    return unit32(c[rng.integers(0, centres, n)] + noise)


SPECS = {
    "exact16": make_spec("exact", float16=True),
    "hnsw": make_spec("hnsw", hnsw_m=16, ef_construction=64, ef_search=64),
    "ivf_pq": make_spec("ivf_pq", nlist=16, nprobe=16, pq_bytes=8, rerank_factor=20),
}
KINDS = list(SPECS)


def build(label, matrix, names, tmp_path):
    coll = make_collection("c", DIM, "fp", SPECS[label], files_dir=tmp_path)
    coll.upsert(names, matrix)
    assert coll.wait_background(60)  # ivf_pq trains in the background
    return coll


def recall(coll, matrix, names, queries, k=10):
    hits = 0
    for q in queries:
        got = [n for n, _ in coll.search(q[np.newaxis].astype(np.float64), [k])[0]]
        want, _ = reference_ranking(matrix, names, q, k)
        hits += len(set(got) & set(want))
    return hits / (k * len(queries))


@pytest.mark.parametrize("label", KINDS)
def test_kind_finds_the_reference_top_k_with_exact_scores(label, tmp_path):
    matrix = clustered(N, 1)
    names = [f"n{i:05d}" for i in range(N)]
    coll = build(label, matrix, names, tmp_path)
    if label == "ivf_pq":
        assert coll.trained  # N is past train_size(16)
    queries = clustered(30, 2)
    r = recall(coll, matrix, names, queries)
    assert r >= (0.99 if label == "exact16" else 0.9), r
    # Scores are float64 over the stored vectors (float16 rows for exact16), ties by name.
    got = coll.search(queries[0][np.newaxis].astype(np.float64), [10])[0]
    scores = [s for _, s in got]
    assert scores == sorted(scores, reverse=True)
    for name, score in got:
        exact = float(matrix[names.index(name)].astype(np.float64) @ unit32(queries[0]).astype(np.float64))
        assert score == pytest.approx(exact, abs=2e-3 if label == "exact16" else 1e-6)


@pytest.mark.parametrize("label", KINDS)
def test_deleted_and_replaced_vectors_never_come_back(label, tmp_path):
    matrix = clustered(N, 3)
    names = [f"n{i:05d}" for i in range(N)]
    coll = build(label, matrix, names, tmp_path)
    gone = names[:200]
    assert coll.delete(gone + ["absent"]) == gone
    replaced = names[200:400]
    new_vectors = clustered(200, 4)
    assert coll.upsert(replaced, new_vectors) == (0, 200)
    assert len(coll) == N - 200
    for j, name in enumerate(gone[:40]):  # the deleted vector itself as the query: never found
        found = [n for n, _ in coll.search(matrix[j][np.newaxis].astype(np.float64), [50])[0]]
        assert not set(found) & set(gone)
    for j, name in enumerate(replaced[:40]):  # the old version's query finds the name only via its new vector
        found = dict(coll.search(matrix[200 + j][np.newaxis].astype(np.float64), [5])[0])
        if name in found:
            new_score = float(new_vectors[j].astype(np.float64) @ unit32(matrix[200 + j]).astype(np.float64))
            assert found[name] == pytest.approx(new_score, abs=2e-3)
        hit = coll.search(new_vectors[j][np.newaxis].astype(np.float64), [1])[0]
        assert hit[0][0] == name
    live = np.concatenate([new_vectors, matrix[400:]])
    live_names = replaced + names[400:]
    assert recall(coll, live, live_names, clustered(20, 5)) >= (0.99 if label == "exact16" else 0.85)


@pytest.mark.parametrize("label", KINDS)
def test_rebuild_once_the_dead_share_passes_the_threshold(label, tmp_path, monkeypatch):
    monkeypatch.setattr(faiss_build, "REBUILD_MIN_DEAD", 10)
    matrix = clustered(N, 6)
    names = [f"n{i:05d}" for i in range(N)]
    coll = build(label, matrix, names, tmp_path)
    dead_limit = faiss_build.REBUILD_DEAD_SHARE * N
    coll.delete(names[: int(dead_limit) - 5])
    assert coll.dead == int(dead_limit) - 5
    coll.delete(names[int(dead_limit) - 5: int(dead_limit) + 50])  # past the share: rebuilt, ids compacted
    assert coll.wait_background(60) and coll.swaps >= 1
    assert coll.dead == 0 and len(coll) == N - int(dead_limit) - 50
    keep = slice(int(dead_limit) + 50, N)
    assert recall(coll, matrix[keep], names[keep], clustered(20, 7)) >= (0.99 if label == "exact16" else 0.85)
    coll.upsert(["after"], matrix[:1])  # still writable after the rebuild
    assert coll.search(matrix[:1].astype(np.float64), [1])[0][0][0] == "after"


@pytest.mark.parametrize("label", KINDS)
def test_writes_during_a_background_rebuild_are_kept_and_dead_ids_never_found(label, tmp_path, monkeypatch):
    """A rebuild held open (small chunks, a pause after each): writes return at
    once, searches never see a deleted or replaced vector before, during or
    after the swap, and the swapped index holds every write made meanwhile."""
    monkeypatch.setattr(faiss_build, "REBUILD_MIN_DEAD", 10)
    monkeypatch.setattr(faiss_build, "REBUILD_CHUNK", 200)
    monkeypatch.setattr(faiss_build, "CATCH_UP_FINAL", 50)
    monkeypatch.setattr(faiss_kind, "REBUILD_PAUSE_S", 0.3)
    matrix = clustered(N, 13)
    names = [f"n{i:05d}" for i in range(N)]
    coll = build(label, matrix, names, tmp_path)
    live = dict(zip(names, matrix))
    dead: set[str] = set()

    def delete(gone):
        assert coll.delete(gone) == gone
        for n in gone:
            del live[n]
        dead.update(gone)

    def check_dead_never_found(probes):
        for j in probes:
            found = {n for n, _ in coll.search(matrix[j][np.newaxis].astype(np.float64), [20])[0]}
            assert not found & dead and found <= set(live), found - set(live)

    delete(names[:N // 3])  # past the share: a rebuild starts, the call returns at once
    assert coll.rebuilding
    fresh = clustered(300, 14)
    during = []
    for step in range(6):  # inserts, replacements and deletes while it runs
        t0 = time.perf_counter()
        new = [f"new{step}-{i}" for i in range(30)]
        coll.upsert(new, fresh[step * 30:(step + 1) * 30])
        live.update(zip(new, fresh[step * 30:(step + 1) * 30]))
        swap = names[N // 3 + step * 20: N // 3 + step * 20 + 20]
        coll.upsert(swap, fresh[200 + step * 10: 200 + step * 10 + 10].repeat(2, axis=0))
        live.update(zip(swap, fresh[200 + step * 10: 200 + step * 10 + 10].repeat(2, axis=0)))
        delete(names[2000 + step * 30: 2000 + step * 30 + 30] + [new[0]])
        during.append(time.perf_counter() - t0)
        check_dead_never_found(range(step, N // 3, 97))
        if step == 3:
            assert coll.rebuilding  # the writes above did not wait for it
    assert max(during) < 1.0, during
    assert coll.wait_background(120) and coll.swaps >= 1
    assert sorted(coll.names()) == sorted(live) and len(coll) == len(live)
    check_dead_never_found(range(0, N, 37))
    for step in range(6):  # a replacement is found by its new vector, an insert made during the build too
        hit = coll.search(fresh[200 + step * 10][np.newaxis].astype(np.float64), [2])[0]
        assert {n for n, _ in hit} <= set(names[N // 3 + step * 20: N // 3 + step * 20 + 20])
        assert coll.search(fresh[step * 30 + 5][np.newaxis].astype(np.float64), [1])[0][0][0] == f"new{step}-5"
    live_names = list(live)
    assert recall(coll, np.stack([live[n] for n in live_names]), live_names, clustered(20, 15)) >= (
        0.99 if label == "exact16" else 0.85)


def test_closing_cancels_a_rebuild_before_its_swap(tmp_path, monkeypatch):
    monkeypatch.setattr(faiss_build, "REBUILD_MIN_DEAD", 10)
    monkeypatch.setattr(faiss_build, "REBUILD_CHUNK", 100)
    monkeypatch.setattr(faiss_kind, "REBUILD_PAUSE_S", 0.2)
    matrix = clustered(N, 16)
    names = [f"n{i:05d}" for i in range(N)]
    coll = build("ivf_pq", matrix, names, tmp_path)
    coll.delete(names[: N // 2])
    assert coll.rebuilding
    coll.stop_background()
    assert not coll.rebuilding and coll.swaps == 1  # the training at build(), not the compaction
    assert coll.dead == N // 2 and not list(tmp_path.glob("*.rebuild"))
    snapshots.save(coll, tmp_path, generation=3)
    again = snapshots.load("c", DIM, "fp", SPECS["ivf_pq"], 3, N - N // 2, tmp_path, created_at=1.0, updated_at=2.0)
    q64 = matrix[N - 1][np.newaxis].astype(np.float64)
    assert again.search(q64, [5]) == coll.search(q64, [5])


@pytest.mark.parametrize("label", ["exact", *KINDS])
def test_index_files_round_trip(label, tmp_path):
    spec = SPECS.get(label, IndexSpec())
    matrix = clustered(N, 8)
    names = [f"n{i:05d}" for i in range(N)]
    coll = make_collection("c/ü", DIM, "fp", spec, files_dir=tmp_path, created_at=1.0, updated_at=2.0)
    coll.upsert(names, matrix)
    coll.delete(names[:10])
    snapshots.save(coll, tmp_path, generation=7)
    args = {"created_at": 1.0, "updated_at": 2.0}
    assert snapshots.load("c/ü", DIM, "fp", spec, 8, N - 10, tmp_path, **args) is None  # stale generation
    again = snapshots.load("c/ü", DIM, "fp", spec, 7, N - 10, tmp_path, **args)
    assert again is not None and len(again) == N - 10 and sorted(again.names()) == sorted(names[10:])
    queries = clustered(5, 9)
    for q in queries:
        q64 = q[np.newaxis].astype(np.float64)
        assert again.search(q64, [10]) == coll.search(q64, [10])
    if label != "exact":
        assert again.dead == 10
        again.upsert(["new"], matrix[:1])
        assert again.search(matrix[:1].astype(np.float64), [1])[0][0][0] == "new"


def test_ivf_pq_answers_exactly_before_it_is_trained(tmp_path):
    spec = make_spec("ivf_pq", nlist=64, pq_bytes=8)
    matrix = clustered(500, 10)
    names = [f"n{i:04d}" for i in range(500)]
    coll = make_collection("c", DIM, "fp", spec, files_dir=tmp_path)
    coll.upsert(names, matrix)
    assert not coll.trained and faiss_build.train_size(64) > 500
    coll.delete(names[:5])
    for q in clustered(5, 11):
        want, _ = reference_ranking(matrix[5:], names[5:], q, 10)
        assert [n for n, _ in coll.search(q[np.newaxis].astype(np.float64), [10])[0]] == want


def test_gallery_index_makes_the_kind_and_reports_it():
    index = Registry()
    index.create("h", DIM, "fp", SPECS["hnsw"])
    index.upsert("h", ["a", "b"], clustered(2, 12))
    (stats,) = index.stats("h")
    assert stats.spec.label == "hnsw" and stats.count == 2
    assert [m.name for m in index.search(Query("h", clustered(1, 12)[0], 1))] == ["a"]


@pytest.mark.parametrize("kind,params,text", [
    ("flat", {}, "unknown index kind"),
    ("hnsw", {"hnsw_m": 1000}, "hnsw_m"),
    ("hnsw", {"float16": True}, "float16 applies to the exact kind only"),
    ("ivf_pq", {"bogus": 1}, "unknown index parameters"),
])
def test_bad_index_options_are_invalid_arguments(kind, params, text):
    with pytest.raises(errors.InvalidArgument, match=text):
        make_spec(kind, **params)


def test_spec_round_trips_through_json():
    spec = make_spec("ivf_pq", nlist=8, nprobe=4, pq_bytes=16, rerank=False)
    assert spec_from_json(spec.kind, spec.to_json()) == spec
    assert make_spec("", float16=False) == IndexSpec()
