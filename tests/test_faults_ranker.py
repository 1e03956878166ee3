"""Ranker faults, on real processes and a real SQLite file:

- the ranker is restarted (SIGTERM, then started again on the same port and
  database) while a client queries: `RankerClient` retries through the gap
  and every answer is right;
- the storage turns read-only under a running ranker (the database, its WAL
  and its folder made immutable): Upsert gets UNAVAILABLE naming what was not
  committed, searches go on, and once the storage is writable again writes
  work, the file passes integrity_check and every acknowledged vector is
  intact. Another process that tries to write the file meanwhile is told the
  database is locked.

(Start-up on a locked, read-only, corrupt or missing database, a full
database during a write and kill -9 durability are in test_ranker_service.py
and test_ranker_durability.py.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest

from clients.channels import RetryPolicy
from clients.errors import ClientError
from clients.ranker import RankerClient
from testkit import ServiceProcess, reference_ranking, unit32
from imagesearch.v1 import ranker_pb2 as pb
from imagesearch.v1 import ranker_pb2_grpc

DIM = 32
TOL = 1e-5


# ---------------------------------------------------------------- restart


@pytest.mark.slow
def test_a_client_querying_through_a_ranker_restart_gets_right_answers(tmp_path):
    rng = np.random.default_rng(11)
    names = [f"g/{i:04d}.jpg" for i in range(400)]
    vectors = rng.standard_normal((len(names), DIM)).astype(np.float32)
    queries = rng.standard_normal((20, DIM)).astype(np.float32)
    refs = [reference_ranking(unit32(vectors), names, q, 5) for q in queries]
    db = tmp_path / "restart.db"

    first = ServiceProcess("ranker_service", "--db", str(db), "--grace", "5")
    port = first.port
    # The default policy's backoff (0.2 s doubling, jittered, 5 attempts) spans
    # about 1.5 s on average; a restart of a ranker process can take longer on
    # a busy machine, so this client waits longer between attempts.
    client = RankerClient(first.address, timeout=30, retry=RetryPolicy(initial_backoff_s=0.5))
    calls: list[tuple[float, float, int, object]] = []  # (start, end, query, matches or error)
    stop = threading.Event()

    def query_loop():
        i = 0
        while not stop.is_set():
            q = i % len(queries)
            begun = time.monotonic()
            try:
                answer = client.search("c", queries[q], top_k=5, fingerprint="fp")
            except ClientError as exc:
                answer = exc
            calls.append((begun, time.monotonic(), q, answer))
            i += 1

    second = None
    try:
        client.upsert("c", zip(names, vectors), fingerprint="fp")
        thread = threading.Thread(target=query_loop)
        thread.start()
        _wait_for(lambda: len(calls) >= 20, first)
        assert first.terminate() == 0, first.output
        down = time.monotonic()
        respawned = time.monotonic()
        second = ServiceProcess("ranker_service", "--db", str(db), "--port", str(port))
        up = time.monotonic()
        _wait_for(lambda: sum(c[0] > up for c in calls) >= 20, second)
        stop.set()
        thread.join(60)
    finally:
        stop.set()
        client.close()
        if second is not None:
            assert second.terminate() == 0, second.output
        first.kill()

    assert second.port == port and "received SIGTERM" in first.output
    errors = [c for c in calls if isinstance(c[3], Exception)]
    assert not errors, errors[:3]
    for _, _, q, matches in calls:
        want_names, want_scores = refs[q]
        assert [m.name for m in matches] == want_names
        assert np.allclose([m.score for m in matches], want_scores, rtol=0, atol=TOL)
    # At least one call was sent to the old process's port before it went away
    # and answered by the new one: retried through the gap.
    bridged = [c for c in calls if c[0] < down and c[1] > respawned]
    assert bridged, f"no call spans the restart ({down - respawned:.2f}s .. {up - respawned:.2f}s)"


def _wait_for(condition, proc: ServiceProcess, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.proc.poll() is None, proc.output
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------- read-only storage, a locked file


def make_immutable(paths) -> callable:
    """chattr +i: not even an already open file can be written (as on a disk
    remounted read-only). Needs root and a file system that supports it."""
    chattr = shutil.which("chattr")
    if os.geteuid() != 0 or chattr is None:
        pytest.skip("needs root and chattr to make open files read-only under a running process")
    done = []

    def undo():
        for path in reversed(done):
            subprocess.run([chattr, "-i", str(path)], check=True)

    for path in paths:
        if subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode != 0:
            undo()
            pytest.skip(f"chattr +i does not work on {path}'s file system")
        done.append(path)
    return undo


def upsert(stub, names, vectors):
    return stub.Upsert(iter([pb.UpsertRequest(collection="c", name=n, vector=v, fingerprint="fp")
                             for n, v in zip(names, vectors)]), timeout=30)


def search_names(stub, vector, k=3) -> list[str]:
    return [r.match.name for r in stub.Search(pb.SearchRequest(collection="c", vector=vector, top_k=k), timeout=30)]


def test_storage_turning_read_only_under_a_running_ranker(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    db = folder / "gallery.db"
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((150, DIM)).astype(np.float32)
    names = [f"n{i:03d}" for i in range(150)]
    stored = unit32(vectors)

    with ServiceProcess("ranker_service", "--db", str(db), "--batch-size", "16") as proc, \
            proc.channel() as channel:
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        assert upsert(stub, names[:100], vectors[:100]).upserted == 100

        # Another process cannot write (or even read) the file the ranker holds.
        with contextlib.closing(sqlite3.connect(db, timeout=0.2)) as other:
            with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                other.execute("DELETE FROM vectors")
                other.commit()

        wal = db.with_name(db.name + "-wal")
        undo = make_immutable([p for p in (db, wal, folder) if p.exists()])
        try:
            with pytest.raises(grpc.RpcError) as info:
                upsert(stub, names[100:], vectors[100:])
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
            details = info.value.details()
            assert "storage unavailable" in details and "were not committed" in details, details
            assert "names 'n100'..'n115'" in details and "0 items of this call were committed" in details, details
            # Reads go on from memory, and memory holds only what is committed.
            assert search_names(stub, vectors[7], 1) == ["n007"]
            (stats,) = stub.GetStats(pb.GetStatsRequest(collection="c"), timeout=30).collections
            assert stats.count == 100
            assert search_names(stub, vectors[120], 1) != ["n120"]
        finally:
            undo()

        # Writable again: the same items go in, nothing else changed.
        reply = upsert(stub, names[100:], vectors[100:])
        assert (reply.upserted, reply.inserted, reply.replaced) == (50, 50, 0)
        assert search_names(stub, vectors[120], 1) == ["n120"]
    assert proc.proc.returncode == 0, proc.output

    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = dict(conn.execute("SELECT name, vector FROM vectors WHERE collection = 'c'"))
    assert sorted(rows) == names
    for i, name in enumerate(names):  # every acknowledged vector, bit-exact
        assert rows[name] == stored[i].astype("<f4").tobytes(), name
