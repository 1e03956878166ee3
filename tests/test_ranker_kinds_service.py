"""Each index kind through a real ranker process on a real SQLite file:
CreateCollection with the kind, deletes and replacements never returned,
a clean restart loads the index files, a kill -9 leaves them stale and the
restart rebuilds from SQLite with every acknowledged write in place."""

from __future__ import annotations

import time

import numpy as np
import pytest

from testkit import ServiceProcess, reference_ranking
from imagesearch.v1 import ranker_pb2 as pb
from imagesearch.v1 import ranker_pb2_grpc
from tests.test_ranker_kinds import DIM, clustered

N = 1500
TIMEOUT = 60
OPTIONS = {
    "exact": pb.IndexOptions(kind=pb.INDEX_KIND_EXACT),
    "exact16": pb.IndexOptions(kind=pb.INDEX_KIND_EXACT, float16=True),
    "hnsw": pb.IndexOptions(kind=pb.INDEX_KIND_HNSW, hnsw_m=16, ef_search=64),
    "ivf_pq": pb.IndexOptions(kind=pb.INDEX_KIND_IVF_PQ, nlist=8, nprobe=8, pq_bytes=8, rerank_factor=20),
}


def search(stub, q, k=10):
    return [r.match.name for r in stub.Search(pb.SearchRequest(collection="k", vector=q, top_k=k), timeout=TIMEOUT)]


def check(stub, live: dict[str, np.ndarray], dead: set[str], queries: np.ndarray, min_recall: float) -> None:
    names = list(live)
    matrix = np.stack([live[n] for n in names])
    hits = 0
    for q in queries:
        got = search(stub, q, 10)
        assert not set(got) & dead
        hits += len(set(got) & set(reference_ranking(matrix, names, q, 10)[0]))
    assert hits / (10 * len(queries)) >= min_recall
    (stats,) = stub.GetStats(pb.GetStatsRequest(collection="k"), timeout=TIMEOUT).collections
    assert stats.count == len(live)


@pytest.mark.parametrize("label", list(OPTIONS))
def test_kind_deletes_replacement_restart_and_kill_9(label, tmp_path):
    db = tmp_path / "kinds.db"
    vectors = clustered(N, 1)
    names = [f"n{i:05d}" for i in range(N)]
    live = dict(zip(names, vectors))
    queries = clustered(15, 2)
    min_recall = 0.99 if label.startswith("exact") else 0.85

    with ServiceProcess("ranker_service", "--db", str(db)) as ranker:
        stub = ranker_pb2_grpc.RankerServiceStub(ranker.channel())
        created = stub.CreateCollection(pb.CreateCollectionRequest(collection="k", dim=DIM, fingerprint="fp",
                                                                   index=OPTIONS[label]), timeout=TIMEOUT)
        assert created.created
        stub.Upsert(iter(pb.UpsertRequest(collection="k", name=n, vector=v, fingerprint="fp")
                         for n, v in zip(names, vectors)), timeout=TIMEOUT)
        stub.Delete(pb.DeleteRequest(collection="k", names=names[:100]), timeout=TIMEOUT)
        dead = set(names[:100])
        for n in names[:100]:
            del live[n]
        fresh = clustered(100, 3)
        stub.Upsert(iter(pb.UpsertRequest(collection="k", name=n, vector=v, fingerprint="fp")
                         for n, v in zip(names[100:200], fresh)), timeout=TIMEOUT)
        live.update(zip(names[100:200], fresh))
        for j in range(0, 100, 10):  # the replaced name is found by its new vector, the deleted never
            assert search(stub, fresh[j], 1) == [names[100 + j]]
            assert names[j] not in search(stub, vectors[j], 20)
        check(stub, live, dead, np.concatenate([queries, vectors[100:105]]), min_recall)
    assert ranker.proc.returncode == 0, ranker.output

    with ServiceProcess("ranker_service", "--db", str(db), env={"IMAGESEARCH_LOG_LEVEL": "INFO"}) as ranker:
        assert "loaded from its index files" in ranker.output, ranker.output
        stub = ranker_pb2_grpc.RankerServiceStub(ranker.channel())
        (stats,) = stub.GetStats(pb.GetStatsRequest(collection="k"), timeout=TIMEOUT).collections
        assert stats.index == stub.CreateCollection(pb.CreateCollectionRequest(
            collection="k", dim=DIM, fingerprint="fp", index=OPTIONS[label]), timeout=TIMEOUT).collection.index
        check(stub, live, dead, queries, min_recall)
        stub.Delete(pb.DeleteRequest(collection="k", names=names[200:250]), timeout=TIMEOUT)  # acknowledged ...
        ranker.kill()  # ... then kill -9: the index files are stale now
    dead |= set(names[200:250])
    for n in names[200:250]:
        del live[n]

    with ServiceProcess("ranker_service", "--db", str(db), env={"IMAGESEARCH_LOG_LEVEL": "INFO"}) as ranker:
        assert "built from SQLite" in ranker.output and "loaded from its index files" not in ranker.output
        stub = ranker_pb2_grpc.RankerServiceStub(ranker.channel())
        check(stub, live, dead, np.concatenate([queries, vectors[200:205]]), min_recall)
    assert ranker.proc.returncode == 0, ranker.output


def test_hnsw_rebuild_runs_outside_the_write_and_survives_kill_9(tmp_path):
    """Deletes past the dead share start a rebuild in the background (held
    open here by a pause after each chunk): the Delete returns at once, writes
    and searches go on while it runs, never returning a deleted vector, and the
    swapped index holds every write made meanwhile. A kill -9 while a second
    rebuild is pending loses nothing acknowledged."""
    db = tmp_path / "rebuild.db"
    n = 4000
    vectors = clustered(n, 21)
    names = [f"n{i:05d}" for i in range(n)]
    live = dict(zip(names, vectors))
    dead: set[str] = set()
    queries = clustered(10, 22)
    env = {"IMAGESEARCH_LOG_LEVEL": "INFO", "IMAGESEARCH_RANKER_REBUILD_PAUSE_S": "2"}
    swapped = "compacted hnsw index in the background"

    def upsert(stub, batch: dict[str, np.ndarray]) -> float:
        t0 = time.perf_counter()
        stub.Upsert(iter(pb.UpsertRequest(collection="k", name=k, vector=v, fingerprint="fp")
                         for k, v in batch.items()), timeout=TIMEOUT)
        live.update(batch)
        dead.difference_update(batch)
        return time.perf_counter() - t0

    def delete(stub, gone: list[str]) -> float:
        t0 = time.perf_counter()
        assert stub.Delete(pb.DeleteRequest(collection="k", names=gone), timeout=TIMEOUT).deleted == len(gone)
        for k in gone:
            del live[k]
        dead.update(gone)
        return time.perf_counter() - t0

    with ServiceProcess("ranker_service", "--db", str(db), env=env) as ranker:
        stub = ranker_pb2_grpc.RankerServiceStub(ranker.channel())
        stub.CreateCollection(pb.CreateCollectionRequest(collection="k", dim=DIM, fingerprint="fp",
                                                         index=OPTIONS["hnsw"]), timeout=TIMEOUT)
        upsert(stub, dict(zip(names, vectors)))
        took = [delete(stub, names[:1100])]  # 27.5% dead: past the share, a rebuild starts
        fresh = clustered(60, 23)
        for step in range(3):  # while it runs: inserts, replacements, deletes
            took.append(upsert(stub, {f"new{step}-{i}": fresh[step * 20 + i] for i in range(10)}))
            took.append(upsert(stub, {names[1100 + step * 10 + i]: fresh[step * 20 + 10 + i] for i in range(10)}))
            took.append(delete(stub, names[3000 + step * 10: 3010 + step * 10]))
            check(stub, live, dead, np.concatenate([queries, vectors[step:step + 3]]), 0.85)
        assert swapped not in ranker.output, "the rebuild ended before the writes: it did not run in the background"
        assert max(took) < 2.0, took  # the rebuild takes at least 2 s x 3 chunks
        deadline = time.monotonic() + TIMEOUT
        while swapped not in ranker.output:
            assert time.monotonic() < deadline, ranker.output
            time.sleep(0.1)
        check(stub, live, dead, np.concatenate([queries, vectors[:5], fresh[:5]]), 0.85)
        for j in range(0, 60, 7):  # what was written during the build is in the swapped index
            want = f"new{j // 20}-{j % 20}" if j % 20 < 10 else names[1100 + (j // 20) * 10 + j % 20 - 10]
            assert search(stub, fresh[j], 1) == [want]

        delete(stub, names[1200:2300])  # a second rebuild ...
        upsert(stub, {"late": fresh[0], names[2500]: fresh[1]})  # ... writes acknowledged during it ...
        delete(stub, [names[2600]])
        assert ranker.output.count(swapped) == 1
        ranker.kill()  # ... and kill -9 before its swap

    with ServiceProcess("ranker_service", "--db", str(db), env={"IMAGESEARCH_LOG_LEVEL": "INFO"}) as ranker:
        assert "built from SQLite" in ranker.output, ranker.output
        stub = ranker_pb2_grpc.RankerServiceStub(ranker.channel())
        check(stub, live, dead, np.concatenate([queries, vectors[1200:1205], fresh[:3]]), 0.85)
        assert search(stub, fresh[0], 2)[0] in {"late", "new0-0"}
        assert search(stub, fresh[1], 1) in (["new0-1"], [names[2500]])
    assert ranker.proc.returncode == 0, ranker.output


@pytest.mark.parametrize("kind", list(OPTIONS))
def test_counts_and_listings_agree_with_searches_during_renames(kind, tmp_path):
    """Renames of every item back and forth while GetStats, ListItems and
    Search read: every count is the collection's size, every listing and
    every listing and answer names each vector once (a renamed item is never
    counted twice or missing). Bounded: 6 rounds of renames, seed 5."""
    import threading

    rng = np.random.default_rng(5)
    n = 400
    vectors = clustered(n, 5)
    with ServiceProcess("ranker_service", "--db", tmp_path / "r.db") as ranker, ranker.channel() as channel:
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(collection="k", dim=DIM, fingerprint="fp",
                                                         index=OPTIONS[kind]), timeout=TIMEOUT)
        stub.Upsert(iter([pb.UpsertRequest(collection="k", name=f"a{i}", vector=vectors[i], fingerprint="fp")
                          for i in range(n)]), timeout=TIMEOUT)
        done = threading.Event()
        wrong: list[str] = []
        reads = [0]

        def read():
            while not done.is_set():
                count = stub.GetStats(pb.GetStatsRequest(collection="k"), timeout=TIMEOUT).collections[0].count
                listed = [i.name for p in stub.ListItems(pb.ListItemsRequest(collection="k"), timeout=TIMEOUT)
                          for i in p.items]
                found = search(stub, vectors[int(rng.integers(n))], k=10)
                for what, got, want in (("count", count, n), ("listing", len(listed), n), ("search", len(found), 10)):
                    if got != want:
                        wrong.append(f"{what} {got}")
                for what, names in (("listed", listed), ("found", found)):
                    if len({name[1:] for name in names}) != len(names):
                        wrong.append(f"a vector {what} under two names")
                reads[0] += 1

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for round_ in range(6):
                a, b = ("a", "b") if round_ % 2 == 0 else ("b", "a")
                reply = stub.Rename(pb.RenameRequest(collection="k", renamings=[
                    pb.Renaming(from_name=f"{a}{i}", to_name=f"{b}{i}") for i in range(n)]), timeout=TIMEOUT)
                assert reply.renamed == n and not reply.not_found
                time.sleep(0.05)
        finally:
            done.set()
            reader.join()
        assert reads[0] >= 3 and not wrong, (reads[0], wrong[:5])
