"""Online backup of the ranker's database, through the ranker itself.

The ranker holds its SQLite file with an exclusive lock, so another process
cannot read it while it runs (an outside `sqlite3 .backup` waits, then fails).
`backup_copy` asks the store for a consistent copy (SQLite's backup API on the
ranker's own connection, in one step under the store's write lock: writes
wait for the copy, searches go on from memory), turns it into a standalone
file (journal_mode=DELETE), checks it with `PRAGMA integrity_check`, counts
what it holds and hashes it. The `Backup` RPC streams that file to the client
in chunks (servicer.py); the copy is deleted when the call ends, however it
ends.

A copy needs free space beside the database for a whole copy: it is refused
up front ("not enough disk for a backup: needs N, has M"), counting the
space copies already running will take. The servicer bounds how many run at
once, on threads of their own at the lowest CPU priority; a copy whose reader
stops reading ends with the server's stream idle timeout.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from imagesearch import errors
from imagesearch.files import sha256_file
from ranker_service.sqlite.store import Store
from ranker_service.types import BackupCopy

log = logging.getLogger(__name__)


def check_copy(path: Path) -> tuple[int, int]:
    """(collections, vectors) of a database copy that passes `PRAGMA integrity_check`;
    a copy that does not is an error."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode = DELETE")  # a standalone file: no -wal beside it
        problems = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise errors.ImageSearchError(f"the backup copy failed its integrity check: {problems[:5]}")
        collections = conn.execute("SELECT count(*) FROM collections").fetchone()[0]
        vectors = conn.execute("SELECT count(*) FROM vectors").fetchone()[0]
    finally:
        conn.close()
    return int(collections), int(vectors)


# Bytes that copies being made will still write, per folder.
_reserved: dict[Path, int] = {}
_reserved_lock = threading.Lock()


@contextlib.contextmanager
def _room_for(store: Store, folder: Path) -> Iterator[None]:
    """Reserve room under `folder` for a copy of the store (the database file
    and its WAL: an upper bound), or refuse the copy when the disk lacks it."""
    need = sum(p.stat().st_size for p in (store.path, Path(f"{store.path}-wal")) if p.exists())
    with _reserved_lock:
        free = shutil.disk_usage(folder).free - _reserved.get(folder, 0)
        if need > free:
            raise errors.ResourceExhausted(
                f"not enough disk for a backup: needs {need} bytes under {folder}, has {max(free, 0)} "
                "(copies running now count against it); free space there, or wait for running backups")
        _reserved[folder] = _reserved.get(folder, 0) + need
    try:
        yield
    finally:
        with _reserved_lock:
            _reserved[folder] -= need


@contextlib.contextmanager
def backup_copy(store: Store, folder: Path | None = None) -> Iterator[BackupCopy]:
    """A checked copy of the store's committed data in a temporary file under
    `folder` (default: the database's own folder, so it needs free space there
    the size of the database, checked first); deleted on exit."""
    folder = Path(folder).resolve() if folder is not None else store.path.resolve().parent
    with _room_for(store, folder), tempfile.TemporaryDirectory(prefix=".backup-", dir=folder) as tmp:
        path = Path(tmp) / store.path.name
        started = time.monotonic()
        store.copy_to(path)
        seconds = time.monotonic() - started
        collections, vectors = check_copy(path)
        copy = BackupCopy(path, path.stat().st_size, sha256_file(path), collections, vectors, seconds)
        log.info("backup copy: %d collections, %d vectors, %d bytes (writes waited %.3f s)",
                 collections, vectors, copy.size, seconds)
        yield copy

