"""Re-ranking through a real ranker process: alpha-weighted query expansion
and k-reciprocal re-ranking, each against an independent dense float64 numpy
reference written here from the definitions in docs/ranker.md#re-ranking;
derived data follows upserts, replacements and deletes; option errors; the
removed DBA option refused on both backends; the Milvus backend's support
(query expansion) and refusals (k-reciprocal).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from testkit import ServiceProcess, unit32
from imagesearch.v1 import ranker_pb2 as pb
from imagesearch.v1 import ranker_pb2_grpc

DIM = 16
FP = "sha256:rerank"
TIMEOUT = 60


# ---------------------------------------------------------------- references (dense, float64, loops)

def _order(scores, names, exclude=None):
    return sorted((j for j in range(len(names)) if j != exclude), key=lambda j: (-scores[j], names[j]))


def ref_plain(G, names, q, k, allowed=None):
    s = G.astype(np.float64) @ q
    order = [j for j in _order(s, names) if allowed is None or names[j] in allowed][:k]
    return [names[j] for j in order], [s[j] for j in order]


def ref_expand(G, names, q, top_n, alpha, allowed=None):
    s = G.astype(np.float64) @ q
    top = [j for j in _order(s, names) if allowed is None or names[j] in allowed][:top_n]
    out = q.copy()
    for j in top:
        out += max(s[j], 0.0) ** alpha * G[j].astype(np.float64)
    return out / np.linalg.norm(out)


def ref_k_reciprocal(G, names, q, k, k1=20, k2=6, lam=0.3, shortlist=100, allowed=None):
    G64 = G.astype(np.float64)
    n = len(G)
    S = G64 @ G64.T
    order = [[i] + _order(S[i], names, exclude=i) for i in range(n)]
    h = max(1, int(np.around(k1 / 2)))

    def R(g, kk):
        return {y for y in order[g][: kk + 1] if g in order[y][: kk + 1]}

    def star(r):
        out = set(r)
        for c in r:
            rc = R(c, h)
            if len(rc & r) > 2 / 3 * len(rc):
                out |= rc
        return out

    V = np.zeros((n, n))
    for g in range(n):
        cols = sorted(star(R(g, k1)))
        w = np.exp(S[g, cols] - 1)
        V[g, cols] = w / w.sum()
    Vqe = np.stack([V[order[g][:k2]].mean(axis=0) for g in range(n)])
    s = G64 @ q
    qorder = _order(s, names)
    rq = {g for g in qorder[:k1] if len(order[g]) <= k1 or s[g] >= S[g, order[g][k1]]}
    vq = np.zeros(n)
    cols = sorted(star(rq))
    if cols:
        w = np.exp(s[cols] - 1)
        vq[cols] = w / w.sum()
    vq = (vq + V[qorder[: k2 - 1]].sum(axis=0)) / (1 + len(qorder[: k2 - 1]))
    cand = [j for j in qorder if allowed is None or names[j] in allowed][: max(shortlist, k)]
    scored = []
    for j in cand:
        jac = 1 - np.minimum(vq, Vqe[j]).sum() / np.maximum(vq, Vqe[j]).sum()
        scored.append((lam * s[j] + (1 - lam) * (1 - jac), names[j]))
    scored.sort(key=lambda t: (-t[0], t[1]))
    return [nm for _, nm in scored[:k]], [sc for sc, _ in scored[:k]]


# ---------------------------------------------------------------- data and service

def clustered(rng, clusters=6, per=20, noise=0.6):
    centres = rng.standard_normal((clusters, DIM))
    raw = np.repeat(centres, per, axis=0) + noise * rng.standard_normal((clusters * per, DIM))
    return unit32(raw)


def unit64(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def ranker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ranker-rerank")
    proc = ServiceProcess("ranker_service", "--db", str(folder / "gallery.db"), startup_timeout=120)
    proc.folder = folder
    yield proc
    assert proc.terminate() == 0, proc.output


@pytest.fixture(scope="module")
def stub(ranker):
    channel = ranker.channel()
    yield ranker_pb2_grpc.RankerServiceStub(channel)
    channel.close()


def upsert(stub, collection, names, vectors, attributes=None):
    attributes = attributes or {}
    return stub.Upsert(iter([pb.UpsertRequest(collection=collection, name=n, vector=v, fingerprint=FP,
                                              attributes=attributes.get(n, {}))
                             for n, v in zip(names, vectors)]), timeout=TIMEOUT)


def create(stub, collection, **options):
    options = pb.IndexOptions(kind=pb.INDEX_KIND_EXACT, **options)
    return stub.CreateCollection(pb.CreateCollectionRequest(collection=collection, dim=DIM, fingerprint=FP,
                                                            index=options), timeout=TIMEOUT)


def search(stub, collection, q, top_k=10, **options):
    matches = [r.match for r in stub.Search(pb.SearchRequest(collection=collection, vector=q, top_k=top_k,
                                                             **options), timeout=TIMEOUT)]
    return [m.name for m in matches], [m.score for m in matches]


def check(got, want, tol=2e-6):
    assert got[0] == want[0]
    np.testing.assert_allclose(got[1], want[1], atol=tol)


@pytest.fixture(scope="module")
def gallery(stub):
    rng = np.random.default_rng(11)
    G = clustered(rng)
    names = [f"g/{i:03d}.jpg" for i in rng.permutation(len(G))]
    attributes = {n: {"half": str(i % 2)} for i, n in enumerate(names)}
    upsert(stub, "plain", names, G, attributes)
    queries = [unit64(G[i].astype(np.float64) + 0.5 * rng.standard_normal(DIM)) for i in (3, 40, 77, 101)]
    return G, names, queries, attributes


# ---------------------------------------------------------------- query expansion

@pytest.mark.parametrize("top_n, alpha", [(2, None), (1, 0.0), (5, 3.0)])
def test_query_expansion_equals_reference(stub, gallery, top_n, alpha):
    G, names, queries, _ = gallery
    qe = pb.QueryExpansion(top_n=top_n) if alpha is None else pb.QueryExpansion(top_n=top_n, alpha=alpha)
    for q in queries:
        want = ref_plain(G, names, ref_expand(G, names, q, top_n, 3.0 if alpha is None else alpha), 10)
        check(search(stub, "plain", q, query_expansion=qe), want)
    assert search(stub, "plain", queries[0], query_expansion=qe)[0] != search(stub, "plain", queries[0])[0] or \
        top_n == 1  # the option is not silently ignored (one neighbour may leave the top 10 alone)


def test_query_expansion_applies_filters_to_both_passes(stub, gallery):
    G, names, queries, attributes = gallery
    allowed = {n for n in names if attributes[n]["half"] == "1"}
    f = [pb.AttributeFilter(key="half", values=["1"])]
    for q in queries:
        want = ref_plain(G, names, ref_expand(G, names, q, 3, 3.0, allowed), 10, allowed)
        check(search(stub, "plain", q, filters=f, query_expansion=pb.QueryExpansion(top_n=3)), want)


# ---------------------------------------------------------------- k-reciprocal

@pytest.mark.parametrize("options", [{}, {"k1": 8, "k2": 3, "lambda": 0.5, "shortlist": 30}])
def test_k_reciprocal_equals_reference(stub, gallery, options):
    G, names, queries, _ = gallery
    kr = pb.KReciprocalRerank(**options)
    args = {"k1": options.get("k1", 20), "k2": options.get("k2", 6), "lam": options.get("lambda", 0.3),
            "shortlist": options.get("shortlist", 100)}
    for q in queries:
        got = search(stub, "plain", q, top_k=15, k_reciprocal=kr)
        check(got, ref_k_reciprocal(G, names, q, 15, **args))
    assert got[0] != search(stub, "plain", queries[-1], top_k=15)[0]


def test_k_reciprocal_with_filters_and_query_expansion(stub, gallery):
    G, names, queries, attributes = gallery
    allowed = {n for n in names if attributes[n]["half"] == "0"}
    f = [pb.AttributeFilter(key="half", values=["0"])]
    for q in queries:
        q2 = ref_expand(G, names, q, 2, 3.0, allowed)
        want = ref_k_reciprocal(G, names, q2, 10, allowed=allowed)
        check(search(stub, "plain", q, filters=f, query_expansion=pb.QueryExpansion(),
                     k_reciprocal=pb.KReciprocalRerank()), want)


def test_search_stream_answers_do_not_depend_on_the_batch(stub, gallery):
    queries = gallery[2]
    kinds = [{}, {"k_reciprocal": pb.KReciprocalRerank()}, {"query_expansion": pb.QueryExpansion(top_n=3)}]
    requests = [pb.SearchStreamRequest(id=f"{i}-{j}", collection="plain", vector=q, top_k=10, **kind)
                for i, q in enumerate(queries) for j, kind in enumerate(kinds)]
    answers = {a.id: [m.name for m in a.matches] for a in stub.SearchStream(iter(requests), timeout=TIMEOUT)}
    for i, q in enumerate(queries):
        for j, kind in enumerate(kinds):
            assert answers[f"{i}-{j}"] == search(stub, "plain", q, **kind)[0]


# ---------------------------------------------------------------- derived data

def test_derived_data_follows_upserts_replacements_and_deletes(stub):
    collection = "kr-writes"
    rng = np.random.default_rng(5)
    G = clustered(rng, clusters=4, per=15)
    names = [f"w{i:03d}" for i in range(len(G))]
    upsert(stub, collection, names, G)
    options = {"k_reciprocal": pb.KReciprocalRerank(k1=6, k2=3)}

    def want(G, names, q):
        return ref_k_reciprocal(G, names, q, 10, k1=6, k2=3)

    q = unit64(G[0].astype(np.float64) + 0.1)
    check(search(stub, collection, q, **options), want(G, names, q), tol=5e-6)
    # replace the best match with a vector far away: its old vector must not answer
    best = search(stub, collection, q, **options)[0][0]
    i = names.index(best)
    G = G.copy()
    G[i] = unit32(-q)
    upsert(stub, collection, [best], G[i:i + 1])
    got = search(stub, collection, q, **options)
    check(got, want(G, names, q), tol=5e-6)
    assert best not in got[0]
    # delete the new best match
    gone = got[0][0]
    stub.Delete(pb.DeleteRequest(collection=collection, names=[gone]), timeout=TIMEOUT)
    keep = [j for j, n in enumerate(names) if n != gone]
    G, names = G[keep], [names[j] for j in keep]
    got = search(stub, collection, q, **options)
    assert gone not in got[0]
    check(got, want(G, names, q), tol=5e-6)
    # a new item next to the query comes first
    upsert(stub, collection, ["new"], unit32(q[np.newaxis]))
    G, names = np.vstack([G, unit32(q[np.newaxis])]), names + ["new"]
    check(search(stub, collection, q, **options), want(G, names, q), tol=5e-6)


def test_k_reciprocal_neighbourhoods_survive_a_restart(tmp_path):
    """Asked for once, a (k1, k2) pair's neighbourhoods are written at the clean stop
    and served by the next start without a build."""
    rng = np.random.default_rng(4)
    G = clustered(rng, clusters=3, per=10)
    names = [f"p{i:02d}" for i in range(len(G))]
    q = unit64(G[7].astype(np.float64) + 0.2)
    want = ref_k_reciprocal(G, names, q, 5, k1=10, k2=3)
    options = {"k_reciprocal": pb.KReciprocalRerank(k1=10, k2=3)}
    for attempt in range(2):
        proc = ServiceProcess("ranker_service", "--db", str(tmp_path / "k.db"), startup_timeout=120)
        try:
            with proc.channel() as channel:
                stub = ranker_pb2_grpc.RankerServiceStub(channel)
                if attempt == 0:
                    create(stub, "plain")
                    upsert(stub, "plain", names, G)
                else:
                    (stats,) = stub.GetStats(pb.GetStatsRequest(collection="plain"), timeout=TIMEOUT).collections
                    info = stats.derived_data
                    assert (info.state, list(info.kinds), info.last_build_seconds) == (
                        pb.DERIVED_STATE_CURRENT, ["k-reciprocal k1=10 k2=3"], 0)
                check(search(stub, "plain", q, top_k=5, **options), want, tol=5e-6)
        finally:
            assert proc.terminate() == 0, proc.output


def test_saved_k_reciprocal_neighbourhoods_load_over_rows_in_another_order(tmp_path):
    """A collection read back from SQLite may hold its rows in another order than
    the one its neighbourhoods were built over: they are rebuilt over the same rows
    in their own order, and rank as before. Stale or damaged files are left out."""
    from ranker_service.rerank.maths import Neighbourhoods
    from ranker_service.sqlite import snapshots as index_files
    from ranker_service.validation import make_k_reciprocal

    class Coll:
        name, dim, fingerprint = "c", DIM, FP

        def __init__(self, rows=None, row_names=None):
            self.rows, self.row_names = rows, row_names

        def __len__(self):
            return len(G)

        def snapshot(self):
            return self.rows.copy(), list(self.row_names)

    rng = np.random.default_rng(5)
    G = clustered(rng, clusters=4, per=12)
    names = [f"n{i:02d}" for i in range(len(G))]
    built = Neighbourhoods.build(G, names, 8, 3)
    index_files.save_k_reciprocal(Coll(), built, tmp_path, 7)
    order = rng.permutation(len(G))
    served = Coll(G[order], [names[i] for i in order])
    (loaded,) = index_files.load_k_reciprocal(served, tmp_path, 7).values()
    options = make_k_reciprocal(8, 3)
    for q in G[:6].astype(np.float64) + 0.05:
        q /= np.linalg.norm(q)
        assert loaded.rerank(q, 10, options) == built.rerank(q, 10, options)
    assert index_files.load_k_reciprocal(served, tmp_path, 8) == {}  # another generation
    other = Coll(G, [f"x{i}" for i in range(len(G))])
    assert index_files.load_k_reciprocal(other, tmp_path, 7) == {}  # other rows
    arrays = dict(built.arrays(), ids=built.ids + len(G))  # damaged: rows that do not exist
    with open(tmp_path / f"{index_files.stem('c')}.kr-8-3.npz", "wb") as f:
        np.savez(f, **arrays)
    assert index_files.load_k_reciprocal(served, tmp_path, 7) == {}
    index_files.remove_k_reciprocal("c", tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- option errors

@pytest.mark.parametrize("options, text", [
    ({"query_expansion": pb.QueryExpansion(top_n=101)}, "top_n 101 is out of range"),
    ({"query_expansion": pb.QueryExpansion(alpha=-1)}, "alpha -1"),
    ({"query_expansion": pb.QueryExpansion(alpha=float("nan"))}, "alpha nan"),
    ({"k_reciprocal": pb.KReciprocalRerank(k1=4, k2=5)}, "k2 5 is out of range 1..k1 (4)"),
    ({"k_reciprocal": pb.KReciprocalRerank(k1=101)}, "k1 101 is out of range"),
    ({"k_reciprocal": pb.KReciprocalRerank(**{"lambda": 1.5})}, "lambda 1.5"),
    ({"k_reciprocal": pb.KReciprocalRerank(shortlist=1001)}, "shortlist 1001"),
])
def test_bad_options_are_invalid_argument(stub, gallery, options, text):
    q = gallery[2][0]
    with pytest.raises(grpc.RpcError) as err:
        search(stub, "plain", q, **options)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in err.value.details()
    answers = list(stub.SearchStream(iter([
        pb.SearchStreamRequest(id="bad", collection="plain", vector=q, **options),
        pb.SearchStreamRequest(id="good", collection="plain", vector=q)]), timeout=TIMEOUT))
    by_id = {a.id: a for a in answers}
    assert by_id["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and text in by_id["bad"].error.message
    assert len(by_id["good"].matches) == 10


def assert_dba_refused(stub, collection):
    """DBA was removed: a CreateCollection that sets it, in any form, is
    INVALID_ARGUMENT saying so and what to use instead; nothing is created."""
    for dba in (pb.DatabaseAugmentation(), pb.DatabaseAugmentation(top_n=2, alpha=3.0)):
        with pytest.raises(grpc.RpcError) as err:
            create(stub, collection, dba=dba)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for text in ("database-side augmentation was removed", "query expansion", "k-reciprocal", "--tta flip"):
            assert text in err.value.details()
    names = [c.name for c in stub.GetStats(pb.GetStatsRequest(), timeout=TIMEOUT).collections]
    assert collection not in names


def test_dba_is_refused(stub):
    assert_dba_refused(stub, "dba")


@pytest.mark.parametrize("label, options", [
    ("hnsw", pb.IndexOptions(kind=pb.INDEX_KIND_HNSW)),
    ("exact16", pb.IndexOptions(kind=pb.INDEX_KIND_EXACT, float16=True)),
    ("ivf_pq", pb.IndexOptions(kind=pb.INDEX_KIND_IVF_PQ, nlist=4, pq_bytes=8)),  # untrained: exact scan
])
def test_query_expansion_and_k_reciprocal_on_other_kinds(stub, gallery, label, options):
    G, names, queries, _ = gallery
    stub.CreateCollection(pb.CreateCollectionRequest(collection=label, dim=DIM, fingerprint=FP, index=options),
                          timeout=TIMEOUT)
    upsert(stub, label, names, G)
    stored = G.astype(np.float16).astype(np.float32) if label == "exact16" else G  # what the kind keeps
    for q in queries[:2]:
        check(search(stub, label, q, k_reciprocal=pb.KReciprocalRerank()), ref_k_reciprocal(stored, names, q, 10))
        check(search(stub, label, q, query_expansion=pb.QueryExpansion()),
              ref_plain(stored, names, ref_expand(stored, names, q, 2, 3.0), 10))


# ---------------------------------------------------------------- the Milvus backend

@pytest.mark.parametrize("backend", ["milvus", "milvus-server"])
def test_milvus_query_expansion_and_refusals(backend, tmp_path, request):
    from tests.test_ranker_backends import backend_args

    rng = np.random.default_rng(9)
    G = clustered(rng, clusters=3, per=10)
    names = [f"m{i:02d}" for i in range(len(G))]
    proc = ServiceProcess("ranker_service", *backend_args(backend, tmp_path, request), startup_timeout=120)
    try:
        with proc.channel() as channel:
            stub = ranker_pb2_grpc.RankerServiceStub(channel)
            upsert(stub, "m", names, G)
            q = unit64(G[2].astype(np.float64) + 0.3)
            check(search(stub, "m", q, query_expansion=pb.QueryExpansion(top_n=3)),
                  ref_plain(G, names, ref_expand(G, names, q, 3, 3.0), 10), tol=1e-5)
            with pytest.raises(grpc.RpcError) as err:
                search(stub, "m", q, k_reciprocal=pb.KReciprocalRerank())
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "SQLite backend" in err.value.details()
            assert_dba_refused(stub, "m-dba")
    finally:
        assert proc.terminate() == 0, proc.output


# ---------------------------------------------------------------- the client library

def test_client_library_options(ranker, gallery):
    from clients.ranker import RankerClient
    from clients.types import KReciprocal, QueryExpansion

    G, names, queries, _ = gallery
    with RankerClient(ranker.address, timeout=TIMEOUT) as client:
        stats, created = client.create_collection("client", DIM, FP)
        assert created and stats.kind == "exact"
        assert client.create_collection("client", DIM, FP)[1] is False
        client.upsert("client", list(zip(names, G)), fingerprint=FP)
        A = G
        q = queries[1]
        got = client.search("client", q, query_expansion=QueryExpansion(4, 1.0), k_reciprocal=KReciprocal(k1=10))
        want = ref_k_reciprocal(A, names, ref_expand(A, names, q, 4, 1.0), 10, k1=10)
        check(([m.name for m in got], [m.score for m in got]), want, tol=5e-6)
        streamed = {r.name: r.matches for r in client.search_stream(
            "client", [(f"q{i}", v) for i, v in enumerate(queries)], k_reciprocal=KReciprocal(lam=0.1))}
        for i, v in enumerate(queries):
            want = ref_k_reciprocal(A, names, v, 10, lam=0.1)
            check(([m.name for m in streamed[f"q{i}"]], [m.score for m in streamed[f"q{i}"]]), want, tol=5e-6)
