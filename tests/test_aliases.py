"""Collection aliases on a real ranker process, through the client library and
real channels, on every backend (SQLite, milvus-lite, a Milvus server):
create/list/switch/drop, every collection RPC through an alias, answers that
name the collection that answered, compare-and-swap, the refusals, and a
SearchStream that keeps its collection across a switch. SQLite only: kill -9
around switches, the switch's log line, and a Backup that carries the aliases."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
import pytest

from clients import AliasInfo, ClientError, RankerClient
from imagesearch.v1 import ranker_pb2 as pb
from imagesearch.v1 import ranker_pb2_grpc
from testkit import ServiceProcess, reference_ranking, unit32
from tests.test_ranker_backends import BACKENDS, backend_args

FP1, FP2 = "fp:model-1", "fp:model-2"
DIMS = {"v1": 8, "v2": 12, "v3": 8}
FPS = {"v1": FP1, "v2": FP2, "v3": FP1}
N = 40
TIMEOUT = 60
CODE = grpc.StatusCode


def vectors(collection: str) -> np.ndarray:
    return unit32(np.random.default_rng(sorted(DIMS).index(collection)).standard_normal((N, DIMS[collection])))


def names(collection: str) -> list[str]:
    return [f"{collection}/{i:03d}.jpg" for i in range(N)]


def refused(fn, code: grpc.StatusCode, *texts: str) -> str:
    with pytest.raises(ClientError) as info:
        fn()
    message = str(info.value)
    assert info.value.code == code, message
    for text in texts:
        assert text in message, message
    return message


@pytest.fixture(scope="module", params=BACKENDS)
def ranker(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"aliases-{request.param}")
    proc = ServiceProcess("ranker_service", *backend_args(request.param, folder, request), startup_timeout=120)
    proc.backend, proc.folder = request.param, folder
    yield proc
    proc.terminate()


@pytest.fixture(scope="module")
def client(ranker):
    with RankerClient(ranker.address, timeout=TIMEOUT) as rank:
        for collection in DIMS:
            assert rank.upsert(collection, zip(names(collection), vectors(collection)),
                               fingerprint=FPS[collection]).inserted == N
        yield rank


def test_create_list_switch_drop_and_every_rpc_through_an_alias(client, ranker):
    assert client.create_alias("live", "v1") == AliasInfo("live", "v1", "")
    assert client.create_alias("live", "v1") == AliasInfo("live", "v1", "")  # the same call again: no error
    assert client.list_aliases() == [AliasInfo("live", "v1", "")]
    query = np.random.default_rng(9).standard_normal(8).astype(np.float32)
    found = client.search("live", query, top_k=5, fingerprint=FP1)
    assert [m.name for m in found] == reference_ranking(vectors("v1"), names("v1"), query, 5)[0]
    assert (found.collection, found.fingerprint) == ("v1", FP1)
    assert client.stats("live").collections[0].name == "v1"

    # A collection of another dimension and model behind the same alias.
    assert client.switch_alias("live", "v2") == AliasInfo("live", "v2", "v1")
    assert client.list_aliases() == [AliasInfo("live", "v2", "v1")]
    query2 = np.random.default_rng(10).standard_normal(12).astype(np.float32)
    found = client.search("live", query2, top_k=3)
    assert [m.name for m in found] == reference_ranking(vectors("v2"), names("v2"), query2, 3)[0]
    assert (found.collection, found.fingerprint) == ("v2", FP2)
    (stats,) = client.stats("live").collections
    assert (stats.name, stats.dim, stats.fingerprint, stats.count) == ("v2", 12, FP2, N)
    (answer,) = client.search_stream("live", [("q", query2)], top_k=2)
    assert (answer.collection, answer.fingerprint) == ("v2", FP2) and len(answer.matches) == 2
    # Writes, listing and renames through the alias reach its collection.
    assert client.upsert("live", [("new.jpg", query2)], fingerprint=FP2).inserted == 1
    assert client.rename("live", [("new.jpg", "renamed.jpg")]).renamed == 1
    assert [i.name for i in client.list_items("live", limit=1)] == ["renamed.jpg"]  # before "v2/..."
    assert client.delete("live", ["renamed.jpg"]).deleted == 1
    assert client.stats("v2").collections[0].count == N

    # Compare-and-swap: refused when the target moved, done when it did not (a roll-back).
    refused(lambda: client.switch_alias("live", "v1", expected="v1"), CODE.ABORTED,
            "points to 'v2', not 'v1' as expected")
    assert client.switch_alias("live", "v1", expected="v2") == AliasInfo("live", "v1", "v2")
    for expected in ("", "v1", "v3"):  # already there: unchanged, no error (a retried switch)
        assert client.switch_alias("live", "v1", expected=expected) == AliasInfo("live", "v1", "v2")
    assert client.search("live", query, top_k=1).collection == "v1"
    client.drop_alias("live")
    assert client.list_aliases() == []
    refused(lambda: client.search("live", query), CODE.NOT_FOUND, "unknown collection 'live'")
    assert client.stats("v1").collections[0].count == N  # the collection stays
    if ranker.backend == "sqlite":
        assert "alias 'live' switched: 'v1' -> 'v2'" in ranker.output
        assert "alias 'live' switched: 'v2' -> 'v1'" in ranker.output


def test_refusals(client, ranker):
    client.create_alias("prod", "v1")
    try:
        # a collection an alias points to cannot be dropped; an alias is not dropped as a collection
        stub = ranker_pb2_grpc.RankerServiceStub(client._channel.channel)
        for name, text in (("v1", "alias 'prod' points to collection 'v1'"),
                           ("prod", "'prod' is an alias of 'v1'; drop the alias with DropAlias")):
            with pytest.raises(grpc.RpcError) as info:
                stub.DropCollection(pb.DropCollectionRequest(collection=name), timeout=TIMEOUT)
            assert info.value.code() == CODE.FAILED_PRECONDITION and text in info.value.details()
        # missing targets, missing aliases
        refused(lambda: client.create_alias("other", "missing"), CODE.NOT_FOUND, "unknown collection 'missing'")
        refused(lambda: client.create_alias("other", "prod"), CODE.NOT_FOUND, "'prod' is an alias (of 'v1')")
        refused(lambda: client.switch_alias("prod", "missing"), CODE.NOT_FOUND, "unknown collection 'missing'")
        refused(lambda: client.switch_alias("nope", "v2"), CODE.NOT_FOUND, "unknown alias 'nope'", "'prod'")
        refused(lambda: client.drop_alias("nope"), CODE.NOT_FOUND, "unknown alias 'nope'")
        refused(lambda: client.drop_alias("v1"), CODE.NOT_FOUND, "'v1' is a collection, not an alias")
        # one namespace, both ways
        refused(lambda: client.create_alias("v2", "v1"), CODE.ALREADY_EXISTS, "'v2' is a collection")
        refused(lambda: client.create_collection("prod", 8, FP1), CODE.ALREADY_EXISTS,
                "'prod' is an alias of collection 'v1'")
        refused(lambda: client.create_alias("prod", "v2"), CODE.ALREADY_EXISTS, "'prod' is an alias")
        # alias names are checked as collection names are
        for bad, text in (("", "empty alias name"), ("x" * 129, "has 129 characters"), ("  ", "is blank"),
                          ("a\x1b[2J", "contains control characters")):
            refused(lambda bad=bad: client.create_alias(bad, "v1"), CODE.INVALID_ARGUMENT, text)
            refused(lambda bad=bad: client.switch_alias(bad, "v1"), CODE.INVALID_ARGUMENT, text)
            refused(lambda bad=bad: client.drop_alias(bad), CODE.INVALID_ARGUMENT, text)
        refused(lambda: client.create_alias("ok", ""), CODE.INVALID_ARGUMENT, "empty collection name")
        assert client.list_aliases() == [AliasInfo("prod", "v1", "")]
    finally:
        client.drop_alias("prod")
    assert client.stats("v1").collections[0].count == N


def test_a_search_stream_answers_from_the_collection_it_started_with(client, ranker):
    client.create_alias("stream", "v1")
    try:
        stub = ranker_pb2_grpc.RankerServiceStub(client._channel.channel)
        sent: queue.Queue = queue.Queue()
        queries = np.random.default_rng(11).standard_normal((6, 8)).astype(np.float32)
        answers = stub.SearchStream(iter(sent.get, None), timeout=TIMEOUT)

        def ask(i: int):
            sent.put(pb.SearchStreamRequest(id=f"q{i}", collection="stream", vector=queries[i], top_k=3))
            return next(answers)

        first = ask(0)
        assert first.collection == "v1"
        client.switch_alias("stream", "v3")  # same dimension and model, other items
        assert client.search("stream", queries[0], top_k=1).collection == "v3"  # new calls see the switch
        later = [ask(i) for i in range(1, 6)]
        sent.put(None)
        assert list(answers) == []
        for i, answer in enumerate([first, *later]):
            assert (answer.collection, answer.fingerprint) == ("v1", FP1), answer
            assert [m.name for m in answer.matches] == reference_ranking(vectors("v1"), names("v1"), queries[i], 3)[0]
        (again,) = client.search_stream("stream", [("q", queries[0])], top_k=3)  # a new stream: the new target
        assert again.collection == "v3" and all(m.name.startswith("v3/") for m in again.matches)
    finally:
        client.drop_alias("stream")


def test_milvus_keeps_its_own_alias(client, ranker, request):
    """On Milvus the alias is Milvus's own: other Milvus clients see it switch."""
    if ranker.backend != "milvus-server":
        pytest.skip("needs a second client of the ranker's Milvus: a Milvus server (a milvus-lite file has one)")
    from pymilvus import MilvusClient

    from ranker_service.milvus.schema import milvus_name

    uri = backend_args(ranker.backend, ranker.folder, request)
    milvus = MilvusClient(uri=uri[uri.index("--milvus-uri") + 1], timeout=TIMEOUT)
    client.create_alias("shared", "v1")
    try:
        assert milvus.describe_collection(milvus_name("shared"))["collection_name"] == milvus_name("v1")
        client.switch_alias("shared", "v3")
        assert milvus.describe_collection(milvus_name("shared"))["collection_name"] == milvus_name("v3")
    finally:
        client.drop_alias("shared")
        milvus.close()


# ---------------------------------------------------------------- SQLite: durability, backups


OTHER = {"v1": "v3", "v3": "v1"}


def start(path) -> ServiceProcess:
    return ServiceProcess("ranker_service", "--db", str(path))


def switch_back_and_forth(rank: RankerClient, target: str, attempted: list, acked: list, stop: threading.Event):
    """Compare-and-swap switches of 'live' between v1 and v3 until `stop` or the ranker is gone."""
    while not stop.is_set():
        target = OTHER[target]
        attempted.append(target)
        try:
            rank.switch_alias("live", target, expected=OTHER[target])
        except ClientError:
            return
        acked.append(target)


def test_switches_survive_kill_9_whole(tmp_path):
    """kill -9 right after an acknowledged switch, and while switches are in
    flight: after each restart the alias points to exactly one of the two
    collections, never behind the last acknowledged switch."""
    path = tmp_path / "aliases.db"
    proc = start(path)
    with RankerClient(proc.address, timeout=TIMEOUT) as rank:
        for collection in ("v1", "v3"):
            rank.upsert(collection, zip(names(collection), vectors(collection)), fingerprint=FP1)
        rank.create_alias("live", "v1")
        assert rank.switch_alias("live", "v3", expected="v1").collection == "v3"
    proc.kill()  # right after the acknowledgement
    for round_ in range(3):
        proc = start(path)
        acked, attempted, stop = [], [], threading.Event()
        with RankerClient(proc.address, timeout=TIMEOUT, retry=None) as rank:
            (alias,) = rank.list_aliases()
            assert alias.collection in OTHER and alias.previous == OTHER[alias.collection]
            if round_ == 0:
                assert alias == AliasInfo("live", "v3", "v1")
            thread = threading.Thread(target=switch_back_and_forth,
                                      args=(rank, alias.collection, attempted, acked, stop))
            thread.start()
            while len(acked) < 20 + 10 * round_:
                time.sleep(0.005)
            proc.kill()
            stop.set()
            thread.join(30)
        assert len(acked) >= 20
        proc = start(path)
        with RankerClient(proc.address, timeout=TIMEOUT) as rank:
            (alias,) = rank.list_aliases()
            in_flight = attempted[len(acked):]
            assert alias.collection in (acked[-1], *in_flight), (alias, acked[-3:], in_flight)
            assert alias.previous == OTHER[alias.collection]
            assert rank.search("live", vectors(alias.collection)[0], top_k=1).collection == alias.collection
        proc.kill()


def test_a_backup_carries_the_aliases(tmp_path):
    proc = start(tmp_path / "live.db")
    try:
        with RankerClient(proc.address, timeout=TIMEOUT) as rank:
            for collection in ("v1", "v3"):
                rank.upsert(collection, zip(names(collection), vectors(collection)), fingerprint=FP1)
            rank.create_alias("live", "v1")
            rank.switch_alias("live", "v3")
            rank.create_alias("old", "v1")
            rank.backup(tmp_path / "copy.db")
    finally:
        assert proc.terminate() == 0
    restored = start(tmp_path / "copy.db")
    try:
        with RankerClient(restored.address, timeout=TIMEOUT) as rank:
            assert rank.list_aliases() == [AliasInfo("live", "v3", "v1"), AliasInfo("old", "v1", "")]
            assert rank.search("live", vectors("v3")[4], top_k=1)[0].name == "v3/004.jpg"
    finally:
        restored.terminate()
