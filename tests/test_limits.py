"""Limits not covered elsewhere. Over a real ranker process: the longest item
name, the largest dimension, and an Upsert stream of any length (committed
batch by batch while the call is still open, so the server never holds more
than one batch of a call); SearchStream's bounded read-ahead; the CLI's
refusal of files over the embedder's byte limit. The limits table in docs/operations.md
names the test behind each limit (the other rows are in test_embedder_*.py,
test_ranker_service.py, test_serving.py, test_clients.py and test_cli.py)."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from clients.embedder import file_source
from clients.errors import UsageError
from imagesearch import serving
from testkit import ServiceProcess
from imagesearch.v1 import ranker_pb2 as pb
from imagesearch.v1 import ranker_pb2_grpc

BATCH = 16


@pytest.fixture(scope="module")
def ranker(tmp_path_factory):
    proc = ServiceProcess("ranker_service", "--db", str(tmp_path_factory.mktemp("limits") / "l.db"),
                          "--batch-size", str(BATCH))
    yield proc
    assert proc.terminate() == 0, proc.output


@pytest.fixture(scope="module")
def stub(ranker):
    with ranker.channel() as channel:
        yield ranker_pb2_grpc.RankerServiceStub(channel)


def _upsert_error(stub, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Upsert(iter([pb.UpsertRequest(**fields)]), timeout=30)
    return info.value


def test_names_up_to_4096_characters(stub):
    ok = stub.Upsert(iter([pb.UpsertRequest(collection="names", name="n" * 4096, vector=[1.0, 2.0])]), timeout=30)
    assert ok.upserted == 1
    error = _upsert_error(stub, collection="names", name="n" * 4097, vector=[1.0, 2.0])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "item 0" in error.details() and "has 4097 characters; at most 4096 are allowed" in error.details()
    assert len(error.details()) < 500, "an over-long name is shortened in the message, not echoed whole"


def test_dimension_up_to_65536(stub):
    error = _upsert_error(stub, collection="wide", name="x", vector=[1.0] * 65537)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "item 0" in error.details() and "65537 values; at most 65536 are allowed" in error.details()
    ok = stub.Upsert(iter([pb.UpsertRequest(collection="wide", name="x", vector=[1.0] * 65536)]), timeout=30)
    assert ok.upserted == 1


def test_an_upsert_stream_is_committed_batch_by_batch_while_it_is_open(stub, ranker):
    """No limit on a stream's length: the ranker commits every --batch-size
    items as they arrive, so they are stored (and searchable) before the call
    ends and the server holds at most one batch of it."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((6 * BATCH, 8)).astype(np.float32)
    seen_mid_call: list[int] = []
    with ranker.channel() as side_channel:
        side = ranker_pb2_grpc.RankerServiceStub(side_channel)

        def count() -> int:
            try:
                (stats,) = side.GetStats(pb.GetStatsRequest(collection="long"), timeout=10).collections
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                return 0
            return stats.count

        def requests():
            for i, v in enumerate(vectors):
                if i == 3 * BATCH:  # the call is open; the first three batches must be in already
                    deadline = time.monotonic() + 30
                    while count() < 3 * BATCH and time.monotonic() < deadline:
                        time.sleep(0.02)
                    seen_mid_call.append(count())
                yield pb.UpsertRequest(collection="long", name=f"i{i:03d}", vector=v)

        reply = stub.Upsert(requests(), timeout=120)
        assert reply.upserted == len(vectors)
        assert seen_mid_call == [3 * BATCH]
        assert count() == len(vectors)


def test_search_stream_reads_at_most_four_batches_ahead():
    """No limit on a SearchStream's length either: the server's reader runs at
    most 4 x --max-batch queries ahead of the answers, then gRPC flow control
    holds the client's sends."""
    pulled = []
    max_batch = 8

    async def run():
        async def endless():
            while True:
                pulled.append(1)
                yield len(pulled)

        async with serving.StreamReader(endless(), ahead=4 * max_batch) as reader:
            first = await reader.batch(max_batch)
            await asyncio.sleep(0.3)  # let the reader run as far as it can
            return len(first)

    first = asyncio.run(run())
    assert len(pulled) == first + 4 * max_batch + 1  # the queue, plus the one item its reader holds


def test_the_cli_refuses_files_over_the_embedders_byte_limit_before_sending(tmp_path):
    """`index`/`query` read files through `file_source` with the limit from
    GetModelInfo: a file over it becomes that item's RESOURCE_EXHAUSTED."""
    path = tmp_path / "big.jpg"
    path.write_bytes(b"\xff" * 1001)
    with pytest.raises(UsageError) as info:
        file_source("big.jpg", path, max_bytes=1000).load()
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "big.jpg is 1001 bytes, over the embedder's limit of 1000 bytes" in str(info.value)
    assert file_source("big.jpg", path, max_bytes=1001).load() == path.read_bytes()
