"""An acknowledged Upsert survives kill -9 of a real ranker process."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time

import grpc
import numpy as np
import pytest

from testkit import ServiceProcess, unit32
from imagesearch.v1 import ranker_pb2 as pb
from imagesearch.v1 import ranker_pb2_grpc

DIM = 64
PER_CALL = 40
BATCH = 16  # --batch-size: every call spans several transactions
KILL_AFTER_ACKED = 25


def call_vectors(call: int) -> np.ndarray:
    return np.random.default_rng(call).standard_normal((PER_CALL, DIM)).astype(np.float32)


def call_names(call: int) -> list[str]:
    return [f"c{call:04d}-{j:02d}" for j in range(PER_CALL)]


def test_acknowledged_upserts_survive_kill_9(tmp_path):
    path = tmp_path / "durable.db"
    proc = ServiceProcess("ranker_service", "--db", str(path), "--batch-size", str(BATCH))
    acked: list[int] = []
    attempted: list[int] = []
    midway = threading.Event()  # set while call >= KILL_AFTER_ACKED is past its first transaction
    failure: list[BaseException] = []

    def requests(call: int):
        for j, (name, vector) in enumerate(zip(call_names(call), call_vectors(call))):
            if len(acked) >= KILL_AFTER_ACKED and j == BATCH + 5:
                midway.set()
                time.sleep(0.05)  # the kill lands here, inside the call
            yield pb.UpsertRequest(collection="durable", name=name, vector=vector, fingerprint="fp")

    def client():
        with proc.channel() as channel:
            stub = ranker_pb2_grpc.RankerServiceStub(channel)
            call = 0
            while True:
                attempted.append(call)
                try:
                    response = stub.Upsert(requests(call), timeout=30)
                except grpc.RpcError:
                    return  # the process is gone
                except BaseException as exc:  # pragma: no cover - reported below
                    failure.append(exc)
                    return
                if response.upserted != PER_CALL:  # pragma: no cover
                    failure.append(AssertionError(f"call {call}: {response}"))
                    return
                acked.append(call)
                call += 1

    thread = threading.Thread(target=client)
    thread.start()
    assert midway.wait(60), f"no progress: {len(acked)} calls acknowledged\n{proc.output}"
    proc.kill()
    thread.join(60)
    assert not failure, failure
    assert len(acked) >= KILL_AFTER_ACKED and attempted[-1] not in acked

    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = dict(conn.execute("SELECT name, vector FROM vectors WHERE collection = 'durable'"))
    for call in acked:  # every acknowledged item, bit-exact
        for name, vector in zip(call_names(call), call_vectors(call)):
            assert rows.get(name) == unit32(vector).astype("<f4").tobytes(), f"acknowledged {name} lost or altered"
    interrupted = [c for c in attempted if c not in acked]
    present = 0
    for call in interrupted:  # absent or exact, never half
        for name, vector in zip(call_names(call), call_vectors(call)):
            if name in rows:
                present += 1
                assert rows[name] == unit32(vector).astype("<f4").tobytes(), f"unacknowledged {name} is torn"
    assert len(rows) == len(acked) * PER_CALL + present  # nothing else

    # The restarted ranker serves exactly what the file holds.
    with ServiceProcess("ranker_service", "--db", str(path)) as again:
        stub = ranker_pb2_grpc.RankerServiceStub(again.channel())
        (stats,) = stub.GetStats(pb.GetStatsRequest(collection="durable"), timeout=30).collections
        assert stats.count == len(rows)
        last = acked[-1]
        (match,) = [r.match for r in stub.Search(
            pb.SearchRequest(collection="durable", vector=call_vectors(last)[7], top_k=1), timeout=30)]
        assert match.name == call_names(last)[7] and match.score == pytest.approx(1.0, abs=1e-6)
    assert again.proc.returncode == 0
