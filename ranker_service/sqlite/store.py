"""The ranker's SQLite database, through sqlite-utils (tables: migrations.py).

Settings (docs/ranker.md#storage), chosen so that an acknowledged write
survives `kill -9` and a power cut: `journal_mode=WAL` (a crash mid-commit
leaves a torn frame that recovery ignores); `synchronous=FULL` (the WAL is
fsync'ed before a commit returns: `NORMAL` would survive kill -9 but not a
power cut; batches amortise the fsync); `locking_mode=EXCLUSIVE` (a second
ranker on the file would serve a stale memory matrix: it is refused at start;
the WAL then needs no -shm file); `page_size=16384` for new files.

Each write is one explicit `BEGIN IMMEDIATE ... COMMIT` transaction around
sqlite-utils' batched `insert_all` (nested inside it as a savepoint) and one
`executemany` UPDATE for replaced rows (keeping their created_at): a batch
is committed whole or not at all. (A bare `with db.conn:` is not enough with
sqlite-utils 4, whose `execute()` commits any implicit transaction it
opened itself.) Start-up problems raise `StoreError` with a message for a
person; a failed write raises the domain error that fits (`ResourceExhausted`
when the database is full, `Unavailable` for I/O errors, ...) and is rolled
back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sqlite_utils

from imagesearch import errors
from imagesearch.errors import StoreError, UnknownMigrations
from ranker_service.sqlite.migrations import MIGRATIONS
from ranker_service.types import StoredItem

log = logging.getLogger(__name__)

PAGE_SIZE = 16384
SYNCHRONOUS = "FULL"
# Rows per multi-row INSERT statement (7 columns: well under SQLite's variable limit).
SQL_BATCH_ROWS = 100
# Names per `IN (...)` lookup.
LOOKUP_CHUNK = 500

STORED_DTYPE = np.dtype("<f4")  # float32 little-endian: the BLOB layout

if not hasattr(sqlite_utils.Database, "atomic"):  # pragma: no cover - depends on the installed version
    raise ImportError("ranker_service needs sqlite-utils >= 4 (nested savepoints inside an explicit transaction)")


@dataclasses.dataclass(frozen=True)
class StoredCollection:
    name: str
    dim: int
    fingerprint: str
    created_at: float
    updated_at: float
    count: int
    kind: str = "exact"
    params: str = "{}"
    generation: int = 0


@dataclasses.dataclass(frozen=True)
class UpsertRow:
    collection: str
    name: str
    vector: np.ndarray  # float32 unit vector (stored as is)
    fingerprint: str
    attributes: str = "{}"  # JSON (attributes.to_json)


def to_blob(vector32: np.ndarray) -> bytes:
    """float32 little-endian bytes of a stored vector."""
    return np.ascontiguousarray(vector32, dtype=STORED_DTYPE).tobytes()


def from_blob(blob: bytes, dim: int) -> np.ndarray:
    """A read-only float32 view of a stored BLOB (ValueError if its length is wrong)."""
    if len(blob) != dim * STORED_DTYPE.itemsize:
        raise ValueError(f"a {dim}-d vector takes {dim * STORED_DTYPE.itemsize} bytes, this BLOB has {len(blob)}")
    return np.frombuffer(blob, dtype=STORED_DTYPE)


def _errorname(exc: sqlite3.Error) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    if name:
        return name
    text = str(exc).lower()  # Python < 3.11 has no sqlite_errorname
    for needle, guess in (("locked", "SQLITE_BUSY"), ("readonly", "SQLITE_READONLY"), ("not a database", "SQLITE_NOTADB"),
                          ("malformed", "SQLITE_CORRUPT"), ("full", "SQLITE_FULL"), ("disk i/o", "SQLITE_IOERR"),
                          ("unable to open", "SQLITE_CANTOPEN")):
        if needle in text:
            return guess
    return "SQLITE_ERROR"


def describe_open_error(path: Path, exc: BaseException) -> str:
    """A message for a person about why `path` cannot be used."""
    if isinstance(exc, UnknownMigrations):
        return f"{path}: {exc}; upgrade the ranker or use another --db"
    name = _errorname(exc) if isinstance(exc, sqlite3.Error) else ""
    if name.startswith("SQLITE_BUSY") or name.startswith("SQLITE_LOCKED"):
        return (f"{path} is locked by another process (another ranker on the same file?): the ranker needs the "
                f"database to itself; stop the other process or use another --db ({exc})")
    if name.startswith("SQLITE_READONLY"):
        return f"{path} is read-only: the ranker must write to it and to its folder; fix the permissions ({exc})"
    if name.startswith("SQLITE_NOTADB"):
        return f"{path} is not a SQLite database (corrupt, or another kind of file): move it away or use another --db"
    if name.startswith("SQLITE_CORRUPT"):
        return (f"{path} is damaged ({exc}): restore it from a backup, or try `sqlite3 {path} .recover`, "
                "or use another --db")
    if name.startswith("SQLITE_FULL"):
        return f"{path}: the disk is full ({exc})"
    if name.startswith("SQLITE_CANTOPEN"):
        return f"cannot open {path} ({exc}): check that its folder exists and is writable"
    return f"cannot use {path}: {exc}"


def write_error(exc: sqlite3.Error, doing: str) -> errors.ImageSearchError:
    """The domain error for a failed write (its transaction is rolled back)."""
    name = _errorname(exc)
    if name.startswith("SQLITE_FULL"):
        return errors.ResourceExhausted(f"{doing}: the database is full (its --max-db-mb limit or the disk): {exc}")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR")):
        return errors.Unavailable(f"{doing}: storage unavailable, retry later: {exc}")
    if name.startswith("SQLITE_READONLY"):
        return errors.FailedPrecondition(f"{doing}: the database has become read-only: {exc}")
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return errors.ImageSearchError(f"{doing}: the database is damaged: {exc}")
    return errors.ImageSearchError(f"{doing}: database error: {exc}")


class Store:
    """The one connection to the ranker's database. Thread-safe (one lock)."""

    def __init__(self, path: Path, db: sqlite_utils.Database):
        self.path = path
        self.db = db
        self._lock = threading.RLock()
        self._closed = False

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike, *, busy_timeout: float = 5.0, max_bytes: int | None = None) -> Store:
        """Open (creating if missing) and migrate the database; lock it for this
        process. Raises StoreError with a clear message when it cannot be used."""
        path = Path(path)
        folder = path.parent if str(path.parent) else Path(".")
        if path.exists() and not path.is_file():
            raise StoreError(f"{path} is not a file")
        if not folder.is_dir():
            raise StoreError(f"cannot create {path}: the folder {folder} does not exist")
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise StoreError(f"{path} is read-only (or unreadable): the ranker must write to it; fix its permissions "
                             "or copy it somewhere writable")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StoreError(f"the folder {folder} is not writable: SQLite must create {path.name}-wal next to "
                             "the database")
        conn = None
        try:
            conn = sqlite3.connect(path, timeout=busy_timeout, check_same_thread=False)
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # no effect on an existing file
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{path}: cannot switch to WAL mode (journal_mode stays {mode!r}): "
                                 "is the file or its folder read-only?")
            conn.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
            conn.execute("PRAGMA foreign_keys = ON")
            if max_bytes:
                page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count = {max(1, int(max_bytes) // page_size)}")
            # Take the write lock now (and, in EXCLUSIVE mode, keep it): a
            # read-only or locked file fails here, at start, not at the first upsert.
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("COMMIT")
            db = sqlite_utils.Database(conn, execute_plugins=False)
            applied = MIGRATIONS.apply(db)
            if applied:
                log.info("%s: applied migrations %s", path, ", ".join(applied))
            store = cls(path, db)
            store._check_schema()
            return store
        except StoreError:
            if conn is not None:
                conn.close()
            raise
        except (sqlite3.Error, UnknownMigrations) as exc:
            if conn is not None:
                conn.close()
            raise StoreError(describe_open_error(path, exc)) from exc

    def _check_schema(self) -> None:
        for table, columns in (("collections", {"name", "dim", "fingerprint", "created_at", "updated_at"}),
                               ("vectors", {"collection", "name", "dim", "fingerprint", "vector", "attributes",
                                            "created_at", "updated_at"})):
            have = set(self.db[table].columns_dict) if self.db[table].exists() else set()
            if not columns <= have:
                raise StoreError(f"{self.path}: table {table!r} lacks columns {sorted(columns - have)}: "
                                 "not a ranker database")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self.db.close()

    def pragma(self, name: str):
        with self._lock:
            return self.db.execute(f"PRAGMA {name}").fetchone()[0]

    # ------------------------------------------------------------ reading

    def collections(self) -> list[StoredCollection]:
        with self._lock:
            try:
                counts = dict(self.db.execute(
                    "SELECT collection, count(*) FROM vectors GROUP BY collection").fetchall())
                rows = self.db.execute(
                    "SELECT name, dim, fingerprint, created_at, updated_at, kind, params, generation "
                    "FROM collections ORDER BY name").fetchall()
            except sqlite3.Error as exc:
                raise StoreError(describe_open_error(self.path, exc)) from exc
        return [StoredCollection(name, int(dim), fingerprint, created_at, updated_at, counts.get(name, 0), kind,
                                 params, int(generation))
                for name, dim, fingerprint, created_at, updated_at, kind, params, generation in rows]

    def aliases(self) -> list[tuple[str, str, str]]:
        """(name, collection, previous collection) of every alias."""
        with self._lock:
            return self.db.execute("SELECT name, collection, previous_collection FROM aliases ORDER BY name").fetchall()

    def generation(self, collection: str) -> int | None:
        """The database generation of the collection's last write (None if unknown)."""
        with self._lock:
            row = self.db.execute("SELECT generation FROM collections WHERE name = ?", [collection]).fetchone()
        return None if row is None else int(row[0])

    def iter_rows(self, collections: Sequence[str] | None = None) -> Iterator[tuple[str, str, int, bytes]]:
        """(collection, name, dim, blob) of every stored vector (of `collections`
        only, if given), in rowid order (one sequential pass over the file).
        For start-up loading."""
        where, args = "", []
        if collections is not None:
            where = f" WHERE collection IN ({','.join('?' * len(collections))})"
            args = list(collections)
        yield from self._stream(f"SELECT collection, name, dim, vector FROM vectors{where} ORDER BY rowid", args)

    def vector(self, collection: str, name: str) -> np.ndarray | None:
        """The stored float32 vector of (collection, name), or None."""
        with self._lock:
            row = self.db.execute("SELECT dim, vector FROM vectors WHERE collection = ? AND name = ?",
                                  [collection, name]).fetchone()
        return None if row is None else from_blob(row[1], row[0]).copy()

    def iter_attributes(self) -> Iterator[tuple[str, str, str]]:
        """(collection, name, attributes JSON) of every item that has attributes. For start-up loading."""
        yield from self._stream("SELECT collection, name, attributes FROM vectors WHERE attributes != '{}' "
                                "ORDER BY rowid", [])

    def _stream(self, sql: str, args: list) -> Iterator[tuple]:
        """The rows of one query as they are read, under the store's lock."""
        with self._lock:
            cursor = self.db.conn.execute(sql, args)
            try:
                yield from cursor
            except sqlite3.Error as exc:
                raise StoreError(describe_open_error(self.path, exc)) from exc
            finally:
                cursor.close()

    def items(self, collection: str, start_after: str, limit: int, *, with_vectors: bool) -> list[StoredItem]:
        """Up to `limit` items of `collection` with names after `start_after`, in name order."""
        columns = "name, attributes, created_at, updated_at, fingerprint" + (", dim, vector" if with_vectors else "")
        with self._lock:
            try:
                rows = self.db.execute(
                    f"SELECT {columns} FROM vectors WHERE collection = ? AND name > ? ORDER BY name LIMIT ?",
                    [collection, start_after, limit]).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(describe_open_error(self.path, exc)) from exc
        return [StoredItem(r[0], r[1], r[2], r[3], r[4], from_blob(r[6], r[5]) if with_vectors else None)
                for r in rows]

    def names(self, collection: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self.db.execute(
                "SELECT name FROM vectors WHERE collection = ? ORDER BY name", [collection]).fetchall()]

    def copy_to(self, target: Path) -> None:
        """Copy the committed database into the new file `target` with SQLite's
        backup API, in one step under the store's lock (no write commits during
        the copy, so it is one consistent snapshot; readers of memory go on)."""
        with self._lock:
            if self._closed:
                raise errors.Unavailable("the ranker is shutting down: its database is closed")
            dest = sqlite3.connect(target)
            try:
                self.db.conn.backup(dest)
            except sqlite3.Error as exc:
                raise write_error(exc, f"backing up into {target}") from exc
            finally:
                dest.close()

    # ------------------------------------------------------------ writing

    @contextlib.contextmanager
    def _transaction(self, doing: str) -> Iterator[None]:
        """One write transaction under the store's lock: BEGIN IMMEDIATE, COMMIT,
        ROLLBACK on any error. A closed store is UNAVAILABLE; an SQLite error
        becomes the domain error of `write_error` (nothing committed)."""
        with self._lock:
            if self._closed:
                raise errors.Unavailable("the ranker is shutting down: its database is closed")
            conn = self.db.conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        try:
                            conn.execute("ROLLBACK")
                        except sqlite3.Error:  # pragma: no cover - the original error matters more
                            log.exception("rollback failed")
                    raise
            except sqlite3.Error as exc:
                raise write_error(exc, doing) from exc

    def _existing(self, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        by_collection: dict[str, list[str]] = {}
        for collection, name in keys:
            by_collection.setdefault(collection, []).append(name)
        found = set()
        for collection, names in by_collection.items():
            for start in range(0, len(names), LOOKUP_CHUNK):
                chunk = names[start:start + LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                for (name,) in self.db.execute(
                        f"SELECT name FROM vectors WHERE collection = ? AND name IN ({marks})", [collection, *chunk]):
                    found.add((collection, name))
        return found

    def upsert(self, rows: Sequence[UpsertRow], new_collections: Sequence[tuple[str, int, str]] = (),
               now: float | None = None) -> set[tuple[str, str]]:
        """Commit `rows` in one transaction (the last of repeated keys wins),
        creating `new_collections` [(name, dim, fingerprint)] first. Returns the
        (collection, name) keys that existed before (replaced, not inserted).
        Raises a domain error (nothing committed) when the write fails."""
        now = time.time() if now is None else now
        with self._transaction(f"committing {len(rows)} items"):
            if new_collections:  # implicit creation: the default kind, exact float32
                self.db["collections"].insert_all(
                    ({"name": name, "dim": dim, "fingerprint": fp, "created_at": now, "updated_at": now,
                      "kind": "exact", "params": "{}"}
                     for name, dim, fp in new_collections), batch_size=SQL_BATCH_ROWS)
            last = {(r.collection, r.name): r for r in rows}
            existing = self._existing(last)
            fresh = [{"collection": r.collection, "name": r.name, "dim": int(r.vector.shape[0]),
                      "fingerprint": r.fingerprint, "vector": to_blob(r.vector),
                      "created_at": now, "updated_at": now, "attributes": r.attributes}
                     for key, r in last.items() if key not in existing]
            again = [(int(r.vector.shape[0]), r.fingerprint, to_blob(r.vector), now, r.attributes, r.collection,
                      r.name)
                     for key, r in last.items() if key in existing]
            if fresh:
                self.db["vectors"].insert_all(fresh, batch_size=SQL_BATCH_ROWS)
            if again:  # an UPDATE, not an upsert: created_at stays
                self.db.conn.executemany(
                    "UPDATE vectors SET dim = ?, fingerprint = ?, vector = ?, updated_at = ?, attributes = ? "
                    "WHERE collection = ? AND name = ?", again)
            for collection in {r.collection for r in rows}:  # (triggers bump the generation)
                self.db.execute("UPDATE collections SET updated_at = ? WHERE name = ?", [now, collection])
        return existing

    def _bump(self) -> int:
        """The next database generation (inside a write transaction; writes to
        `vectors` bump it by trigger, see migrations.m001)."""
        self.db.execute("UPDATE ranker_state SET value = value + 1 WHERE key = 'generation'")
        return int(self.db.execute("SELECT value FROM ranker_state WHERE key = 'generation'").fetchone()[0])

    def create_collection(self, name: str, dim: int, fingerprint: str, kind: str, params: str,
                          now: float | None = None) -> StoredCollection:
        """Create an empty collection (the caller checked it does not exist)."""
        now = time.time() if now is None else now
        with self._transaction(f"creating collection {name!r}"):
            generation = self._bump()
            self.db["collections"].insert({"name": name, "dim": dim, "fingerprint": fingerprint, "created_at": now,
                                           "updated_at": now, "kind": kind, "params": params,
                                           "generation": generation})
        return StoredCollection(name, dim, fingerprint, now, now, 0, kind, params, generation)

    def set_alias(self, name: str, collection: str, previous: str) -> None:
        """Make or switch an alias, in one transaction."""
        with self._transaction(f"setting alias {name!r}"):
            self.db.execute("INSERT OR REPLACE INTO aliases (name, collection, previous_collection, updated_at) "
                            "VALUES (?, ?, ?, ?)", [name, collection, previous, time.time()])

    def drop_alias(self, name: str) -> None:
        with self._transaction(f"dropping alias {name!r}"):
            self.db.execute("DELETE FROM aliases WHERE name = ?", [name])

    def drop_collection(self, name: str) -> int:
        """Delete a collection and its vectors in one transaction; returns how many vectors it held."""
        with self._transaction(f"dropping collection {name!r}"):
            count = self.db.execute("SELECT count(*) FROM vectors WHERE collection = ?", [name]).fetchone()[0]
            self.db.execute("DELETE FROM vectors WHERE collection = ?", [name])
            self.db.execute("DELETE FROM collections WHERE name = ?", [name])
        return int(count)

    def rename(self, collection: str, renamings: Sequence[tuple[str, str]],
               now: float | None = None) -> list[tuple[str, str]]:
        """Rename items in one transaction, in order (a target that exists is
        replaced); returns the renamings done (those whose source existed)."""
        now = time.time() if now is None else now
        done = []
        with self._transaction(f"renaming {len(renamings)} items of {collection!r}"):
            for old, new in renamings:
                if not self._existing([(collection, old)]):
                    continue
                if new != old:
                    self.db.execute("DELETE FROM vectors WHERE collection = ? AND name = ?", [collection, new])
                    self.db.execute("UPDATE vectors SET name = ?, updated_at = ? WHERE collection = ? AND name = ?",
                                    [new, now, collection, old])
                done.append((old, new))
            if done:
                self.db.execute("UPDATE collections SET updated_at = ? WHERE name = ?", [now, collection])
        return done

    def delete(self, collection: str, names: Sequence[str], now: float | None = None) -> list[str]:
        """Delete names in one transaction; returns those that existed, in request order."""
        now = time.time() if now is None else now
        with self._transaction(f"deleting {len(names)} names from {collection!r}"):
            wanted = list(dict.fromkeys(names))  # request order, without repeats
            found = self._existing((collection, n) for n in wanted)
            existing = [n for n in wanted if (collection, n) in found]
            for start in range(0, len(existing), LOOKUP_CHUNK):
                chunk = existing[start:start + LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                self.db.execute(f"DELETE FROM vectors WHERE collection = ? AND name IN ({marks})",
                                [collection, *chunk])
            if existing:
                self.db.execute("UPDATE collections SET updated_at = ? WHERE name = ?", [now, collection])
        return existing


def bulk_load(store: Store, collection: str, names: Sequence[str], vectors32: np.ndarray,
              fingerprint: str = "", batch: int = 2000) -> None:
    """Write many float32 unit vectors straight through the store, `batch`
    per transaction (benchmarks, imports). No validation: the caller
    normalises (see `validation.unit_vector`); a running ranker holds the lock."""
    vectors32 = np.asarray(vectors32, dtype=np.float32)
    known = {c.name for c in store.collections()}
    for start in range(0, len(names), batch):
        rows = [UpsertRow(collection, names[i], vectors32[i], fingerprint)
                for i in range(start, min(start + batch, len(names)))]
        new = [] if collection in known else [(collection, int(vectors32.shape[1]), fingerprint)]
        store.upsert(rows, new)
        known.add(collection)
