"""Online backup of the ranker's database while it is being written: every
copy passes `PRAGMA integrity_check`, is one consistent snapshot (whole
transactions only), holds exactly the committed vectors, bit for bit, and is
a standalone file another ranker can open."""

from __future__ import annotations

import sqlite3
import threading
import time

import numpy as np
import pytest

from imagesearch import errors
from ranker_service.servicer import read_chunks
from ranker_service.sqlite.backup import backup_copy
from ranker_service.sqlite.store import Store, UpsertRow, from_blob

DIM = 64
BATCH = 50


def unit_rows(start: int, n: int, rng) -> list[UpsertRow]:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return [UpsertRow("c", f"n{start + i:06d}", v[i], "fp") for i in range(n)]


def test_backup_copies_under_concurrent_writes_are_whole_checked_snapshots(tmp_path):
    store = Store.open(tmp_path / "live.db")
    rng = np.random.default_rng(0)
    written: dict[str, np.ndarray] = {}
    store.upsert(first := unit_rows(0, BATCH, rng), [("c", DIM, "fp")])
    written.update((r.name, r.vector) for r in first)
    stop = threading.Event()
    commits = [1]

    def writer():
        i = BATCH
        while not stop.is_set():
            rows = unit_rows(i, BATCH, rng)
            store.upsert(rows)
            written.update((r.name, r.vector) for r in rows)
            commits[0] += 1
            i += BATCH

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    try:
        for _ in range(5):
            before = commits[0]
            with backup_copy(store) as copy:
                after = commits[0]
                assert copy.path.parent.parent == tmp_path and copy.size == copy.path.stat().st_size
                conn = sqlite3.connect(copy.path)
                assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
                assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
                rows = conn.execute("SELECT name, dim, vector FROM vectors").fetchall()
                conn.close()
                assert copy.vectors == len(rows) and copy.collections == 1
                assert len(rows) % BATCH == 0, "a transaction was copied in part"
                assert before * BATCH <= len(rows) <= (after + 1) * BATCH
                for name, dim, blob in rows:
                    np.testing.assert_array_equal(from_blob(blob, dim), written[name])
                assert b"".join(read_chunks(copy.path, 4096)) == copy.path.read_bytes()
                seen.append(len(rows))
            assert not copy.path.exists(), "the temporary copy is deleted"
    finally:
        stop.set()
        thread.join()
    assert seen == sorted(seen) and seen[-1] > seen[0], f"writes went on between backups: {seen}"
    store.close()


def test_a_copy_opens_as_a_ranker_database_of_its_own(tmp_path):
    store = Store.open(tmp_path / "live.db")
    rows = unit_rows(0, 10, np.random.default_rng(1))
    store.upsert(rows, [("c", DIM, "fp")])
    with backup_copy(store) as copy:
        restored = tmp_path / "restored.db"
        restored.write_bytes(copy.path.read_bytes())
    store.close()
    again = Store.open(restored)
    assert [c.count for c in again.collections()] == [10]
    np.testing.assert_array_equal(again.vector("c", "n000003"), rows[3].vector)
    again.close()


def test_a_closed_store_cannot_be_backed_up(tmp_path):
    store = Store.open(tmp_path / "live.db")
    store.close()
    with pytest.raises(errors.Unavailable), backup_copy(store):
        pass


def test_a_backup_the_disk_has_no_room_for_is_refused_up_front(tmp_path, monkeypatch):
    import shutil

    store = Store.open(tmp_path / "live.db")
    store.upsert(unit_rows(0, 200, np.random.default_rng(1)), [("c", DIM, "fp")])
    size = sum(p.stat().st_size for p in tmp_path.glob("live.db*") if p.name in ("live.db", "live.db-wal"))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=size // 2))
    with pytest.raises(errors.ResourceExhausted, match=r"not enough disk for a backup: needs \d+ bytes .* has \d+"), \
            backup_copy(store):
        pass
    assert not list(tmp_path.glob(".backup-*"))
    # Room for one copy, not two: the second is refused while the first is being made.
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=int(size * 1.8)))
    with backup_copy(store) as first:
        assert first.vectors == 200
        with pytest.raises(errors.ResourceExhausted, match="copies running now count"), backup_copy(store):
            pass
    with backup_copy(store):  # the first one's room is free again
        pass
    store.close()


# ---------------------------------------------------------------- through a real ranker


def _fill(address: str, n: int, dim: int = 256) -> None:
    from clients.ranker import RankerClient

    rng = np.random.default_rng(3)
    with RankerClient(address) as client:
        for start in range(0, n, 2000):
            v = rng.standard_normal((2000, dim)).astype(np.float32)
            client.upsert("c", [(f"n{start + i:06d}", v[i]) for i in range(2000)], fingerprint="fp")


def test_backups_are_capped_and_one_whose_reader_stops_reading_is_ended(tmp_path):
    """Calls past --max-backups are refused as RESOURCE_EXHAUSTED while copies
    run; a copy nobody reads is ended after --stream-idle-timeout and deleted, and
    the ranker then takes backups again."""
    import grpc

    from imagesearch.v1 import ranker_pb2, ranker_pb2_grpc
    from testkit import ServiceProcess

    with ServiceProcess("ranker_service", "--db", str(tmp_path / "live.db"), "--max-backups", "2",
                        "--stream-idle-timeout", "2") as ranker, ranker.channel() as channel:
        _fill(ranker.address, 20000)   # ~20 MB: far more than HTTP/2 buffers hold
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        unread = [stub.Backup(ranker_pb2.BackupRequest(), timeout=60) for _ in range(2)]
        for call in unread:
            next(call)   # one chunk: the copy is made and being sent
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.Backup(ranker_pb2.BackupRequest(), timeout=60))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-backups 2" in refused.value.details()
        deadline = time.monotonic() + 30
        while list(tmp_path.glob(".backup-*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not list(tmp_path.glob(".backup-*")), "an unread copy is still on disk"
        for call in unread:
            with pytest.raises(grpc.RpcError) as ended:
                for _ in call:
                    pass
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "wrote no response for 2 s" in ended.value.details()
        whole = b"".join(r.chunk for r in stub.Backup(ranker_pb2.BackupRequest(), timeout=60))
        assert len(whole) > 20000 * 256 * 4


def test_imagesearch_backup_of_a_ranker_being_written_restores_into_a_new_ranker(tmp_path):
    import subprocess
    import sys

    from clients.ranker import RankerClient
    from testkit import ROOT, ServiceProcess

    rng = np.random.default_rng(2)
    written: dict[str, np.ndarray] = {}
    stop = threading.Event()
    calls = [0]
    out = tmp_path / "backup.db"
    with ServiceProcess("ranker_service", "--db", str(tmp_path / "live.db"), "--batch-size", str(BATCH)) as ranker:
        with RankerClient(ranker.address) as client:
            def writer():
                i = 0
                while not stop.is_set():
                    rows = unit_rows(i, BATCH, rng)
                    client.upsert("c", [(r.name, r.vector) for r in rows], fingerprint="fp")
                    written.update((r.name, r.vector) for r in rows)
                    calls[0] += 1
                    i += BATCH

            thread = threading.Thread(target=writer)
            thread.start()
            try:
                while calls[0] < 3:
                    stop.wait(0.05)

                def backup(*extra: str) -> subprocess.CompletedProcess:
                    return subprocess.run([sys.executable, "-m", "clients.cli", "backup", str(out), "--ranker",
                                           ranker.address, *extra], check=False, cwd=ROOT, capture_output=True,
                                          text=True, timeout=120)
                first = backup()
                assert first.returncode == 0, first.stderr
                again = backup()
                assert again.returncode == 2 and "--force" in again.stderr, "an existing file is kept"
                before = calls[0]
                forced = backup("--force")
                assert forced.returncode == 0, forced.stderr
                after = calls[0]
            finally:
                stop.set()
                thread.join()
            assert "backed up" in forced.stderr and "vectors in 1 collections" in forced.stderr
    conn = sqlite3.connect(out)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = conn.execute("SELECT name, dim, vector FROM vectors").fetchall()
    conn.close()
    assert len(rows) % BATCH == 0 and before * BATCH <= len(rows) <= (after + 1) * BATCH
    assert f"backed up {len(rows)} vectors" in forced.stderr
    for name, dim, blob in rows:  # the ranker renormalises what it stores: the last bit may differ
        np.testing.assert_allclose(from_blob(blob, dim), written[name], atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files left"

    restored = tmp_path / "restored.db"
    restored.write_bytes(out.read_bytes())
    with ServiceProcess("ranker_service", "--db", str(restored)) as again, RankerClient(again.address) as client:
        assert client.stats().collection("c").count == len(rows)
        name, dim, blob = rows[len(rows) // 2]
        assert client.search("c", from_blob(blob, dim), top_k=1)[0].name == name
