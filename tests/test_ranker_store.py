"""The ranker's SQLite store and the SQLite backend (store + memory) on a real
SQLite file, without gRPC."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess

import numpy as np
import pytest
import sqlite_utils

from imagesearch import errors
from imagesearch.errors import StoreError
from testkit import unit32
from ranker_service.sqlite.backend import SqliteBackend
from ranker_service.sqlite.migrations import MIGRATIONS, MIGRATIONS_TABLE, Migrations, m001_collections_and_vectors
from ranker_service.sqlite.store import Store, UpsertRow
from ranker_service.types import Query, UpsertItem


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "ranker.db"


@pytest.fixture
def store(db_path):
    s = Store.open(db_path, busy_timeout=0.2)
    yield s
    s.close()


def open_gallery(path, **kw) -> SqliteBackend:
    gallery = SqliteBackend(Store.open(path, busy_timeout=0.2), **kw)
    gallery.load()
    return gallery


@contextlib.contextmanager
def raw(path):
    """A plain sqlite3 connection to check or damage the file (the store must
    be closed: it locks the file while open); committed and closed after."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


def make_read_only(path):
    """Make `path` read-only even for root (chattr +i), or skip."""
    if os.geteuid() != 0:
        os.chmod(path, 0o444)
        return lambda: os.chmod(path, 0o644)
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root without a working `chattr +i`: cannot make a file read-only")
    return lambda: subprocess.run([chattr, "-i", str(path)], check=True)


# ---------------------------------------------------------------- schema and settings


def test_new_database_is_wal_fsynced_locked_and_migrated(store, db_path):
    assert db_path.exists()
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("synchronous") == 2  # FULL
    assert store.pragma("locking_mode") == "exclusive"
    assert store.pragma("page_size") == 16384
    applied = [r[0] for r in store.db.execute(f"SELECT name FROM {MIGRATIONS_TABLE}")]
    assert applied == MIGRATIONS.names == ["m001_collections_and_vectors", "m002_aliases"]
    assert {"collections", "vectors", "aliases"} <= set(store.db.table_names())
    store.close()
    reopened = Store.open(db_path)
    assert MIGRATIONS.pending(reopened.db) == []
    reopened.close()


def test_a_database_from_before_aliases_gains_their_table_and_keeps_its_rows(db_path):
    with raw(db_path) as conn:  # as a ranker without aliases left it: migration 1 only
        older = Migrations()
        older(m001_collections_and_vectors)
        older.apply(sqlite_utils.Database(conn))
    with contextlib.closing(Store.open(db_path)) as store:
        store.upsert([UpsertRow("c", "a.jpg", unit32([1, 0]), "fp")], [("c", 2, "fp")])
    with contextlib.closing(Store.open(db_path)) as store:
        assert MIGRATIONS.applied(store.db) == MIGRATIONS.names and store.names("c") == ["a.jpg"]
        store.set_alias("live", "c", "")
        assert store.aliases() == [("live", "c", "")]
        with pytest.raises(errors.ImageSearchError, match="FOREIGN KEY"):  # a target cannot go from under an alias
            store.drop_collection("c")
        with pytest.raises(errors.ImageSearchError, match="FOREIGN KEY"):
            store.set_alias("dangling", "missing", "")
        assert store.names("c") == ["a.jpg"] and store.aliases() == [("live", "c", "")]


def test_vector_rows_hold_float32_le_blob_dim_fingerprint_and_timestamps(store, db_path):
    v = unit32([3.0, -4.0, 0.5])
    store.upsert([UpsertRow("c", "a.jpg", v, "fp1")], [("c", 3, "fp1")], now=100.0)
    existing = store.upsert([UpsertRow("c", "a.jpg", unit32([1, 2, 3]), "fp1"),
                             UpsertRow("c", "b.jpg", v, "fp1")], now=200.0)
    assert existing == {("c", "a.jpg")}
    store.close()
    with raw(db_path) as conn:
        rows = conn.execute("SELECT collection, name, dim, fingerprint, vector, created_at, updated_at "
                            "FROM vectors ORDER BY name").fetchall()
        coll = conn.execute("SELECT name, dim, fingerprint, created_at, updated_at FROM collections").fetchall()
    assert coll == [("c", 3, "fp1", 100.0, 200.0)]
    (c1, n1, d1, f1, blob1, created1, updated1), (_, n2, _, _, blob2, created2, _) = rows
    assert (c1, n1, d1, f1) == ("c", "a.jpg", 3, "fp1")
    assert blob1 == unit32([1, 2, 3]).astype("<f4").tobytes()  # replaced, little-endian float32
    assert (created1, updated1) == (100.0, 200.0)  # created_at kept on replace
    assert (n2, blob2, created2) == ("b.jpg", v.astype("<f4").tobytes(), 200.0)


def test_delete_returns_only_existing_names(store):
    store.upsert([UpsertRow("c", n, unit32([1, 0]), "") for n in "abc"], [("c", 2, "")])
    assert store.delete("c", ["a", "zz", "c", "a"]) == ["a", "c"]
    assert store.names("c") == ["b"]


def test_database_from_a_newer_version_is_refused(db_path):
    Store.open(db_path).close()
    with raw(db_path) as conn:
        conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (name, applied_at) VALUES ('m099_future', 'x')")
    with pytest.raises(StoreError, match="m099_future.*newer version"):
        Store.open(db_path)


# ---------------------------------------------------------------- unusable files


def test_not_a_database_is_refused_with_a_clear_message(db_path):
    db_path.write_bytes(b"this is not sqlite at all\n" * 400)
    with pytest.raises(StoreError, match="is not a SQLite database"):
        Store.open(db_path)


def test_file_locked_by_another_connection_is_refused(store, db_path):
    with pytest.raises(StoreError, match="locked by another process"):
        Store.open(db_path, busy_timeout=0.1)


def test_read_only_file_is_refused(db_path):
    Store.open(db_path).close()
    undo = make_read_only(db_path)
    try:
        with pytest.raises(StoreError, match="read-only"):
            Store.open(db_path)
    finally:
        undo()


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store.open(tmp_path / "no" / "such" / "ranker.db")


@pytest.mark.parametrize("damage,text", [
    ("UPDATE vectors SET vector = zeroblob(10) WHERE name = 'n3'", "vector 'n3' of collection 'c' has dim 4 and a 10-byte"),
    ("UPDATE vectors SET dim = 5 WHERE name = 'n1'", "vector 'n1' of collection 'c' has dim 5"),
    ("UPDATE vectors SET vector = X'0000C07F0000803F0000803F0000803F' WHERE name = 'n2'", "'n2' of collection 'c' holds NaN"),
])
def test_damaged_rows_fail_the_load_naming_the_row(db_path, damage, text):
    gallery = open_gallery(db_path)
    gallery.upsert(UpsertItem("c", f"n{i}", [1.0, i, 0, 1], "") for i in range(5))
    gallery.close()
    with raw(db_path) as conn:
        conn.execute(damage)
    gallery = SqliteBackend(Store.open(db_path))
    with pytest.raises(StoreError, match=text):
        gallery.load()
    gallery.close()


# ---------------------------------------------------------------- the SQLite backend


def test_gallery_upsert_commits_then_memory_and_survives_reopen(db_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((600, 16)).astype(np.float32)
    gallery = open_gallery(db_path, batch_size=64)
    result = gallery.upsert(UpsertItem("c", f"n{i}", vectors[i], "fp") for i in range(600))
    assert (result.upserted, result.inserted, result.replaced) == (600, 600, 0)
    again = gallery.upsert([UpsertItem("c", "n1", vectors[2], "fp"), UpsertItem("c", "new", vectors[3], "fp"),
                            UpsertItem("c", "new", vectors[4], "fp")])
    assert (again.upserted, again.inserted, again.replaced) == (3, 1, 2)
    assert gallery.delete("c", ["n0", "ghost"]).not_found == ["ghost"]
    before = {m.name: m.score for m in gallery.search(Query("c", vectors[7], 50))}
    gallery.close()

    gallery = open_gallery(db_path)
    assert gallery.stats()[0].count == 600
    assert {m.name: m.score for m in gallery.search(Query("c", vectors[7], 50))} == before
    coll = gallery.index.get("c")
    expected = unit32(vectors[4].astype(np.float64))
    np.testing.assert_array_equal(coll.vector("new"), expected)
    np.testing.assert_array_equal(gallery.store.vector("c", "new"), expected)
    np.testing.assert_array_equal(coll.vector("n1"), unit32(vectors[2].astype(np.float64)))
    assert "n0" not in coll
    gallery.close()


def test_upsert_failing_at_item_n_keeps_the_items_before_it(db_path):
    gallery = open_gallery(db_path, batch_size=4)
    items = [UpsertItem("c", f"n{i}", [1.0, i + 1.0, 0.0], "fp") for i in range(10)]
    items[7] = UpsertItem("c", "bad7", [1.0, float("nan"), 0.0], "fp")
    with pytest.raises(errors.InvalidArgument) as info:
        gallery.upsert(iter(items))
    message = str(info.value)
    assert "item 7 (name 'bad7')" in message and "vector[1] is nan" in message
    assert "7 items of this call were committed" in message
    assert gallery.store.names("c") == sorted(f"n{i}" for i in range(7))
    assert sorted(gallery.index.get("c").names()) == sorted(f"n{i}" for i in range(7))
    gallery.close()


@pytest.mark.parametrize("bad,error,text", [
    (UpsertItem("c", "", [1.0, 2.0], "fp"), errors.InvalidArgument, "item 3 (name '')"),
    (UpsertItem("c", "x", [1.0, 2.0, 3.0], "fp"), errors.InvalidArgument, "has 3 values but collection 'c' has dimension 2"),
    (UpsertItem("c", "x", [0.0, 0.0], "fp"), errors.InvalidArgument, "all-zero"),
    (UpsertItem("c", "x", [1.0, float("inf")], "fp"), errors.InvalidArgument, "vector[1] is inf"),
    (UpsertItem("c", "x", [1.0, 1.0], "other"), errors.FailedPrecondition, "fingerprint 'other' differs"),
    (UpsertItem("", "x", [1.0, 1.0], "fp"), errors.InvalidArgument, "empty collection name"),
])
def test_each_bad_item_is_named_and_earlier_items_stay(db_path, bad, error, text):
    gallery = open_gallery(db_path, batch_size=100)
    items = [UpsertItem("c", f"n{i}", [1.0, float(i)], "fp") for i in range(3)] + [bad]
    with pytest.raises(error) as info:
        gallery.upsert(items)
    assert text in str(info.value)
    assert "3 items of this call were committed" in str(info.value)
    assert gallery.store.names("c") == ["n0", "n1", "n2"]
    gallery.close()


def test_collection_keeps_its_first_dim_and_fingerprint_across_batches(db_path):
    gallery = open_gallery(db_path, batch_size=2)
    # Both items are checked against the collection the first one creates,
    # even though they land in different transactions.
    with pytest.raises(errors.InvalidArgument, match="item 1 .*dimension 2"):
        gallery.upsert([UpsertItem("new", "a", [1.0, 0.0], "f"), UpsertItem("new", "b", [1.0, 0.0, 0.0], "f")])
    (stats,) = gallery.stats("new")
    assert (stats.dim, stats.fingerprint, stats.count) == (2, "f", 1)
    gallery.close()


def test_full_database_fails_the_write_cleanly(db_path):
    """A write that cannot fit (--max-db-mb) is RESOURCE_EXHAUSTED; earlier
    batches stay committed; the file passes integrity_check."""
    gallery = SqliteBackend(Store.open(db_path, max_bytes=400_000), batch_size=16)
    gallery.load()
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((400, 256)).astype(np.float32)
    with pytest.raises(errors.ResourceExhausted) as info:
        gallery.upsert(UpsertItem("c", f"n{i:03d}", vectors[i], "") for i in range(400))
    message = str(info.value)
    assert "database is full" in message and "were not committed" in message
    committed = gallery.store.names("c")
    assert 0 < len(committed) < 400 and len(committed) % 16 == 0
    assert f"{len(committed)} items of this call were committed before them" in message
    assert sorted(gallery.index.get("c").names()) == committed
    gallery.close()
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM vectors").fetchone()[0] == len(committed)


def test_closed_gallery_refuses_writes(db_path):
    gallery = open_gallery(db_path)
    gallery.close()
    with pytest.raises(errors.Unavailable, match="shutting down"):
        gallery.upsert([UpsertItem("c", "a", [1.0], "")])


def test_gallery_is_unavailable_until_loaded_and_validates_deletes(db_path):
    gallery = SqliteBackend(Store.open(db_path))
    with pytest.raises(errors.Unavailable, match="still loading"):
        gallery.search(Query("c", [1.0, 0.0]))
    gallery.load()
    gallery.upsert([UpsertItem("c", "a", [1.0, 0.0], "")])
    with pytest.raises(errors.InvalidArgument, match=r"names\[1\]: empty name"):
        gallery.delete("c", ["a", ""])
    with pytest.raises(errors.NotFound, match="unknown collection 'nope'"):
        gallery.delete("nope", ["a"])
    assert gallery.delete("c", []).deleted == 0
    assert gallery.store.names("c") == ["a"]
    gallery.close()
