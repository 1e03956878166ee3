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
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from imagesearch import errors
from ranker_service.sqlite.store import Store
from ranker_service.types import BackupCopy

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def backup_copy(store: Store, folder: Path | None = None) -> Iterator[BackupCopy]:
    """A checked copy of the store's committed data in a temporary file under
    `folder` (default: the database's own folder, so it needs free space there
    the size of the database); deleted on exit."""
    folder = Path(folder) if folder is not None else store.path.resolve().parent
    with tempfile.TemporaryDirectory(prefix=".backup-", dir=folder) as tmp:
        path = Path(tmp) / store.path.name
        started = time.monotonic()
        store.copy_to(path)
        seconds = time.monotonic() - started
        collections, vectors = check_copy(path)
        copy = BackupCopy(path, path.stat().st_size, _sha256(path), collections, vectors, seconds)
        log.info("backup copy: %d collections, %d vectors, %d bytes (writes waited %.3f s)",
                 collections, vectors, copy.size, seconds)
        yield copy
