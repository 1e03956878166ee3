"""Item attributes on a real ranker process, on every backend (SQLite,
milvus-lite and a Milvus server): stored with each item (and kept over a restart), returned with
matches on request, equality and IN filters applied before top-k in Search
and SearchStream, ListItems paging and filtering, Rename, and
INVALID_ARGUMENT past the limits."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from imagesearch import defaults
from testkit import ServiceProcess, reference_ranking, unit32
from imagesearch.v1 import ranker_pb2 as pb
from imagesearch.v1 import ranker_pb2_grpc
from ranker_service.memory.attributes import AttributeTable
from ranker_service.validation import check_filters
from tests.test_ranker_backends import BACKENDS, backend_args

DIM = 16
N = 300
TIMEOUT = 30
SHOPS = ("a", "b", "c")


def item_attributes(i: int) -> dict[str, str]:
    attrs = {"shop": SHOPS[i % 3], "class": "rare" if i % 50 == 0 else "common"}
    if i % 2:
        attrs["odd"] = "yes"
    return attrs


@pytest.fixture(scope="module", params=BACKENDS)
def ranker(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"ranker-{request.param}")
    proc = ServiceProcess("ranker_service", *backend_args(request.param, folder, request), "--batch-size", "64",
                          startup_timeout=120)
    proc.backend, proc.folder = request.param, folder
    yield proc
    proc.terminate()


@pytest.fixture(scope="module")
def stub(ranker):
    ch = ranker.channel()
    yield ranker_pb2_grpc.RankerServiceStub(ch)
    ch.close()


@pytest.fixture(scope="module")
def data(stub):
    rng = np.random.default_rng(7)
    vectors = unit32(rng.standard_normal((N, DIM)))
    names = [f"img/{i:04d}.jpg" for i in range(N)]
    reply = stub.Upsert(iter(pb.UpsertRequest(collection="c", name=n, vector=v, fingerprint="fp",
                                              attributes=item_attributes(i))
                             for i, (n, v) in enumerate(zip(names, vectors))), timeout=TIMEOUT)
    assert reply.upserted == N
    return names, vectors, rng


def search(stub, vector, filters, top_k=10, with_attributes=False):
    request = pb.SearchRequest(collection="c", vector=vector, top_k=top_k, with_attributes=with_attributes,
                               filters=[pb.AttributeFilter(key=k, values=v) for k, v in filters])
    return [r.match for r in stub.Search(request, timeout=TIMEOUT)]


def expected(names, vectors, query, k, keep):
    idx = [i for i in range(len(names)) if keep(i)]
    return reference_ranking(vectors[idx], [names[i] for i in idx], query, k)[0]


def test_equality_and_in_filters_rank_only_passing_items_before_top_k(stub, data):
    names, vectors, rng = data
    query = rng.standard_normal(DIM)
    # Six items are "rare" (0, 50, ..., 250): a filtered top-10 returns all six, best first.
    got = search(stub, query, [("class", ["rare"])])
    assert [m.name for m in got] == expected(names, vectors, query, 10, lambda i: i % 50 == 0)
    assert len(got) == 6
    # IN on shop, AND with equality on odd.
    got = search(stub, query, [("shop", ["a", "c"]), ("odd", ["yes"])], top_k=25, with_attributes=True)
    want = expected(names, vectors, query, 25, lambda i: i % 3 in (0, 2) and i % 2 == 1)
    assert [m.name for m in got] == want and len(got) == 25
    assert all(m.attributes["shop"] in ("a", "c") and m.attributes["odd"] == "yes" for m in got)
    assert dict(got[0].attributes) == item_attributes(names.index(got[0].name))
    # A value nobody has: no matches; no attributes unless asked for.
    assert search(stub, query, [("shop", ["zzz"])]) == []
    assert all(not m.attributes for m in search(stub, query, []))


def test_search_stream_filters_per_query_and_bad_filters_are_item_errors(stub, data):
    names, vectors, rng = data
    queries = rng.standard_normal((3, DIM))
    requests = [
        pb.SearchStreamRequest(id="rare", collection="c", vector=queries[0], top_k=5,
                               filters=[pb.AttributeFilter(key="class", values=["rare"])]),
        pb.SearchStreamRequest(id="bad", collection="c", vector=queries[1], top_k=5,
                               filters=[pb.AttributeFilter(key="", values=["x"])]),
        pb.SearchStreamRequest(id="all", collection="c", vector=queries[2], top_k=5),
    ]
    answers = {r.id: r for r in stub.SearchStream(iter(requests), timeout=TIMEOUT)}
    assert [m.name for m in answers["rare"].matches] == expected(names, vectors, queries[0], 5,
                                                                 lambda i: i % 50 == 0)
    assert answers["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "attribute key" in answers["bad"].error.message
    assert [m.name for m in answers["all"].matches] == expected(names, vectors, queries[2], 5, lambda i: True)


def test_list_items_pages_filters_and_resumes(stub, data):
    names, vectors, _ = data
    pages = list(stub.ListItems(pb.ListItemsRequest(collection="c", page_size=64), timeout=TIMEOUT))
    assert [len(p.items) for p in pages] == [64, 64, 64, 64, 44]
    listed = [i for p in pages for i in p.items]
    assert [i.name for i in listed] == sorted(names)
    assert dict(listed[3].attributes) == item_attributes(3)
    assert listed[0].updated_at > 0 and listed[0].fingerprint == "fp" and not listed[0].vector
    after = [i.name for p in stub.ListItems(pb.ListItemsRequest(collection="c", start_after=names[289], limit=5))
             for i in p.items]
    assert after == names[290:295]
    rare = [i for p in stub.ListItems(pb.ListItemsRequest(
        collection="c", with_vectors=True, filters=[pb.AttributeFilter(key="class", values=["rare"])]))
        for i in p.items]
    assert [i.name for i in rare] == [names[i] for i in range(0, N, 50)]
    np.testing.assert_array_equal(np.asarray(rare[1].vector, dtype=np.float32), vectors[50])
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ListItems(pb.ListItemsRequest(collection="nope"), timeout=TIMEOUT))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_filter_values_with_quotes_backslashes_and_unicode(stub, data):
    _, vectors, _ = data
    odd = ['say "hi"', "back\\slash", "it's", "ünï ✓", "a\" or attributes[\"shop\"] == \"a"]
    stub.Upsert(iter([pb.UpsertRequest(collection="odd", name=f"{i}.jpg", vector=vectors[i], fingerprint="fp",
                                       attributes={"tag": v, "k\"ey": v}) for i, v in enumerate(odd)]), timeout=TIMEOUT)
    for i, v in enumerate(odd):
        for key in ("tag", "k\"ey"):
            got = [r.match.name for r in stub.Search(pb.SearchRequest(
                collection="odd", vector=vectors[0], top_k=10, filters=[pb.AttributeFilter(key=key, values=[v])]))]
            assert got == [f"{i}.jpg"], (key, v, got)


def test_limits_are_invalid_argument(stub, data):
    _, vectors, _ = data
    too_many = {f"k{i}": "v" for i in range(defaults.MAX_ATTRIBUTES + 1)}
    for attrs, needle in ((too_many, "attributes"), ({"k" * (defaults.MAX_ATTRIBUTE_KEY_CHARS + 1): "v"}, "key"),
                          ({"k": "v" * (defaults.MAX_ATTRIBUTE_VALUE_CHARS + 1)}, "characters"),
                          ({"bad\nkey": "v"}, "control")):
        with pytest.raises(grpc.RpcError) as err:
            stub.Upsert(iter([pb.UpsertRequest(collection="c", name="x.jpg", vector=vectors[0], fingerprint="fp",
                                               attributes=attrs)]), timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, attrs
        assert needle in err.value.details()
    filters = [("shop", ["a"])] * (defaults.MAX_FILTERS + 1)
    with pytest.raises(grpc.RpcError) as err:
        search(stub, vectors[0], filters)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        search(stub, vectors[0], [("shop", [])])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_attribute_table_postings_follow_replace_delete_and_rename():
    t = AttributeTable()
    t.set([("a", {"k": "1"}), ("b", {"k": "1", "j": "x"}), ("c", {"k": "2"})])
    k1 = check_filters([("k", ["1"])], what="t")
    assert t.matching(k1) == {"a", "b"}
    t.set([("a", {"k": "2"})])
    assert t.matching(k1) == {"b"}
    assert t.matching(check_filters([("k", ["1", "2"]), ("j", ["x"])], what="t")) == {"b"}
    t.rename([("b", "c")])
    assert t.matching(k1) == {"c"} and t.matching(check_filters([("k", ["2"])], what="t")) == {"a"}
    t.delete(["c"])
    assert t.matching(k1) == set() and len(t) == 1


ANN_N = 2000


@pytest.mark.parametrize("options", [
    pb.IndexOptions(kind=pb.INDEX_KIND_HNSW),
    pb.IndexOptions(kind=pb.INDEX_KIND_IVF_PQ, nlist=16, nprobe=2, pq_bytes=8),
    pb.IndexOptions(kind=pb.INDEX_KIND_EXACT, float16=True),
], ids=["hnsw", "ivf_pq", "exact16"])
def test_filters_return_k_matches_on_every_index_kind(ranker, stub, options):
    """A selective filter (1% of the items, below FILTER_EXACT_SCAN_SHARE) is
    answered by an exact scan of the passing rows: exactly the reference.
    A broad one (50%) goes through the ANN index with over-fetch: still k
    matches, every one passing. Fewer passing items than k: all of them."""
    if ranker.backend.startswith("milvus") and options.float16:
        pytest.skip("the Milvus backend keeps float32 vectors only")
    if ranker.backend == "milvus" and options.kind == pb.INDEX_KIND_IVF_PQ:
        pytest.skip("milvus-lite cannot load an IVF_PQ collection again after a restart (reserved for a future "
                    "phase), and the last test here restarts the ranker")
    collection = f"ann-{options.kind}-{int(options.float16)}"
    stub.CreateCollection(pb.CreateCollectionRequest(collection=collection, dim=DIM, fingerprint="fp",
                                                     index=options), timeout=TIMEOUT)
    rng = np.random.default_rng(11)
    vectors = unit32(rng.standard_normal((ANN_N, DIM)))
    names = [f"{i:05d}" for i in range(ANN_N)]
    stub.Upsert(iter(pb.UpsertRequest(collection=collection, name=n, vector=v, fingerprint="fp",
                                      attributes={"one": str(i % 100 == 0), "half": str(i % 2), "few": str(i < 5)})
                     for i, (n, v) in enumerate(zip(names, vectors))), timeout=TIMEOUT)
    for q in rng.standard_normal((3, DIM)):
        def run(key, value, k=10, q=q):
            request = pb.SearchRequest(collection=collection, vector=q, top_k=k,
                                       filters=[pb.AttributeFilter(key=key, values=[value])])
            return [r.match.name for r in stub.Search(request, timeout=TIMEOUT)]

        assert run("one", "True") == expected(names, vectors, q, 10, lambda i: i % 100 == 0)
        assert run("few", "True") == expected(names, vectors, q, 10, lambda i: i < 5)
        half = run("half", "1", k=20)
        assert len(half) == 20 and all(int(n) % 2 == 1 for n in half)
        want = expected(names, vectors, q, 20, lambda i: i % 2 == 1)
        # Recall against the exact top-20 of the passing items (ivf_pq's own
        # recall on random 16-d data is too low to bound here).
        floor = {pb.INDEX_KIND_HNSW: 16, pb.INDEX_KIND_EXACT: 18}.get(options.kind, 0)
        assert len(set(half) & set(want)) >= floor, (half, want)


def test_overlapping_renames_are_refused_unless_in_order(stub, data):
    rng = np.random.default_rng(4)
    v = unit32(rng.standard_normal((3, DIM)))
    stub.Upsert(iter([pb.UpsertRequest(collection="o", name=n, vector=v[i], fingerprint="fp")
                      for i, n in enumerate(["x", "y", "z"])]), timeout=TIMEOUT)

    def rename(*pairs, in_order=False):
        return stub.Rename(pb.RenameRequest(collection="o", in_order=in_order, renamings=[
            pb.Renaming(from_name=a, to_name=b) for a, b in pairs]), timeout=TIMEOUT)

    for pairs in ((("x", "y"), ("y", "x")), (("x", "a"), ("x", "b")), (("x", "a"), ("z", "a"))):
        with pytest.raises(grpc.RpcError) as refused:
            rename(*pairs)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "renamings[0]" in refused.value.details() and "renamings[1]" in refused.value.details()
        assert "in_order" in refused.value.details()
    names = lambda: sorted(i.name for p in stub.ListItems(pb.ListItemsRequest(collection="o")) for i in p.items)  # noqa: E731
    assert names() == ["x", "y", "z"]  # nothing renamed
    # In order, like mv: x replaces y, then goes on to w; a source renamed already is not found again.
    reply = rename(("x", "y"), ("y", "w"), ("x", "q"), in_order=True)
    assert reply.renamed == 2 and list(reply.not_found) == ["x"]
    assert names() == ["w", "z"]
    got = [r.match for r in stub.Search(pb.SearchRequest(collection="o", vector=v[0], top_k=1), timeout=TIMEOUT)]
    assert got[0].name == "w" and got[0].score == pytest.approx(1.0, abs=1e-6)


def test_rename_keeps_vector_and_attributes_and_survives_restart(ranker, stub, data, request):
    """(Last in the module: it restarts the ranker.)"""
    rng = np.random.default_rng(3)
    v = unit32(rng.standard_normal((3, DIM)))
    stub.Upsert(iter([pb.UpsertRequest(collection="r", name=n, vector=v[i], fingerprint="fp",
                                       attributes={"class": n[0]}) for i, n in enumerate(["a.jpg", "b.jpg", "c.jpg"])]),
                timeout=TIMEOUT)
    reply = stub.Rename(pb.RenameRequest(collection="r", renamings=[
        pb.Renaming(from_name="a.jpg", to_name="moved/a.jpg"), pb.Renaming(from_name="c.jpg", to_name="b.jpg"),
        pb.Renaming(from_name="gone.jpg", to_name="x.jpg")]), timeout=TIMEOUT)
    assert reply.renamed == 2 and list(reply.not_found) == ["gone.jpg"]

    def check(s):
        items = {i.name: i for p in s.ListItems(pb.ListItemsRequest(collection="r", with_vectors=True)) for i in p.items}
        assert sorted(items) == ["b.jpg", "moved/a.jpg"]
        np.testing.assert_array_equal(np.asarray(items["moved/a.jpg"].vector, dtype=np.float32), v[0])
        np.testing.assert_array_equal(np.asarray(items["b.jpg"].vector, dtype=np.float32), v[2])
        assert dict(items["b.jpg"].attributes) == {"class": "c"}
        top = [r.match for r in s.Search(pb.SearchRequest(collection="r", vector=v[0], top_k=1, with_attributes=True,
                                                          filters=[pb.AttributeFilter(key="class", values=["a"])]))]
        assert top[0].name == "moved/a.jpg" and top[0].score == pytest.approx(1.0, abs=1e-6)

    check(stub)
    # Deleting an item drops it from filters too.
    stub.Delete(pb.DeleteRequest(collection="c", names=["img/0000.jpg"]), timeout=TIMEOUT)
    assert "img/0000.jpg" not in [m.name for m in search(stub, v[0], [("class", ["rare"])])]
    assert ranker.terminate() == 0
    again = ServiceProcess("ranker_service", *backend_args(ranker.backend, ranker.folder, request), startup_timeout=120)
    try:
        ch = again.channel()
        s = ranker_pb2_grpc.RankerServiceStub(ch)
        check(s)
        got = [r.match for r in s.Search(pb.SearchRequest(
            collection="c", vector=v[0], top_k=10, filters=[pb.AttributeFilter(key="class", values=["rare"])]))]
        assert len(got) == 5 and "img/0000.jpg" not in [m.name for m in got]
        ch.close()
    finally:
        again.terminate()


def test_filtered_search_falls_back_to_the_exact_scan_when_the_index_finds_too_few():
    """An ANN kind's filtered search that returns fewer than min(k, passing)
    matches is answered by the exact scan of the passing rows instead; a
    selective filter goes to the exact scan at once."""
    from ranker_service.memory import filtering
    from ranker_service.memory.registry import make_collection
    from ranker_service.validation import make_spec

    class Blind:  # an index that finds nothing that passes
        def __init__(self, coll):
            self.coll, self.spec = coll, coll.spec

        def __len__(self):
            return len(self.coll)

        def search_filtered(self, query64, k, names):
            return []

        def search_among(self, query64, k, names):
            return self.coll.search_among(query64, k, names)

    rng = np.random.default_rng(5)
    n = 2000
    vectors = unit32(rng.standard_normal((n, DIM)))
    names = [f"{i:05d}" for i in range(n)]
    coll = make_collection("x", DIM, "", make_spec("hnsw"))
    coll.upsert(names, vectors)
    q = rng.standard_normal(DIM)
    q /= np.linalg.norm(q)
    half = {names[i] for i in range(0, n, 2)}
    got = filtering.filtered_search(coll, q, 10, half)
    assert len(got) == 10 and all(name in half for name, _ in got)
    few = {names[i] for i in range(0, n, 400)}  # 5 items: exact
    assert [n for n, _ in filtering.filtered_search(Blind(coll), q, 10, few)] == \
        reference_ranking(vectors[::400], sorted(few), q, 10)[0]
    assert [n for n, _ in filtering.filtered_search(Blind(coll), q, 10, half)] == \
        reference_ranking(vectors[::2], sorted(half), q, 10)[0]
