"""Numbered schema migrations of the ranker's SQLite database.

Shaped like simonw/llm's `embeddings_migrations.py`: each migration is a
function `mNNN_what(db)` registered in order; a `_ranker_migrations` table
records the ones applied. Each migration runs in one transaction together with
its record, so a crash leaves it either applied and recorded or neither.
A database that records a migration this code does not know was written by a
newer ranker: opening it is refused rather than guessed at.
"""

from __future__ import annotations

import datetime
import re
from typing import Callable

import sqlite_utils

from imagesearch.errors import UnknownMigrations

MIGRATIONS_TABLE = "_ranker_migrations"
_NAME = re.compile(r"^m(\d{3})_\w+$")

Migration = Callable[[sqlite_utils.Database], None]


class Migrations:
    def __init__(self, table: str = MIGRATIONS_TABLE):
        self.table = table
        self._migrations: list[Migration] = []

    def __call__(self, fn: Migration) -> Migration:
        m = _NAME.match(fn.__name__)
        if not m:
            raise ValueError(f"migration {fn.__name__!r} must be named mNNN_description")
        number = int(m.group(1))
        if number != len(self._migrations) + 1:
            raise ValueError(f"migration {fn.__name__!r} is out of order: expected number {len(self._migrations) + 1}")
        self._migrations.append(fn)
        return fn

    @property
    def names(self) -> list[str]:
        return [fn.__name__ for fn in self._migrations]

    def applied(self, db: sqlite_utils.Database) -> list[str]:
        if not db[self.table].exists():
            return []
        return [row[0] for row in db.execute(f"SELECT name FROM [{self.table}] ORDER BY rowid").fetchall()]

    def pending(self, db: sqlite_utils.Database) -> list[str]:
        done = set(self.applied(db))
        unknown = sorted(done - set(self.names))
        if unknown:
            raise UnknownMigrations(
                f"the database records migrations this ranker does not know ({', '.join(unknown)}): "
                "it was written by a newer version")
        return [name for name in self.names if name not in done]

    def apply(self, db: sqlite_utils.Database) -> list[str]:
        """Apply pending migrations in order, each in its own transaction
        together with its record. Returns the names applied."""
        pending = set(self.pending(db))
        conn = db.conn
        done = []
        for fn in self._migrations:
            if fn.__name__ not in pending:
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                if not db[self.table].exists():
                    db[self.table].create({"name": str, "applied_at": str}, pk="name")
                fn(db)
                db[self.table].insert({"name": fn.__name__,
                                       "applied_at": datetime.datetime.now(datetime.timezone.utc).isoformat()})
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            done.append(fn.__name__)
        return done


MIGRATIONS = Migrations()


@MIGRATIONS
def m001_collections_and_vectors(db: sqlite_utils.Database) -> None:
    """A collection keeps the dimension and fingerprint of its first vector,
    its index kind and parameters (JSON; see types.IndexSpec) and the database
    generation of its last write; a vector row is unique per (collection,
    name) and holds the unit vector as float32 little-endian bytes, its
    dimension, its model fingerprint and its item's attributes (a JSON object
    of strings with sorted keys, '{}' for none). `ranker_state` holds the one
    generation counter. Triggers bump it, and stamp the collection, on every
    insert, update and delete of a vector row, whoever writes (the ranker or
    a person with the sqlite3 shell), so index files checked against it at
    start-up are never taken for current after a change."""
    db["collections"].create(
        {"name": str, "dim": int, "fingerprint": str, "created_at": float, "updated_at": float, "kind": str,
         "params": str, "generation": int},
        pk="name",
        not_null={"dim", "fingerprint", "created_at", "updated_at", "kind", "params", "generation"},
        defaults={"kind": "exact", "params": "{}", "generation": 0},
    )
    db["vectors"].create(
        {"collection": str, "name": str, "dim": int, "fingerprint": str, "vector": bytes,
         "created_at": float, "updated_at": float, "attributes": str},
        pk=("collection", "name"),
        not_null={"dim", "fingerprint", "vector", "created_at", "updated_at", "attributes"},
        defaults={"attributes": "{}"},
        foreign_keys=[("collection", "collections", "name")],
    )
    db["ranker_state"].create({"key": str, "value": int}, pk="key", not_null={"value"})
    db["ranker_state"].insert({"key": "generation", "value": 0})
    for event, row in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD")):
        db.execute(f"""
            CREATE TRIGGER vectors_generation_{event.lower()} AFTER {event} ON vectors BEGIN
                UPDATE ranker_state SET value = value + 1 WHERE key = 'generation';
                UPDATE collections SET generation = (SELECT value FROM ranker_state WHERE key = 'generation')
                    WHERE name = {row}.collection;
            END""")


@MIGRATIONS
def m002_aliases(db: sqlite_utils.Database) -> None:
    """An alias names a collection (a foreign key: a collection an alias
    points to cannot be deleted) and keeps the collection it pointed to before
    its last switch ('' before the first; it may since have been dropped).
    Each change is one row written in one transaction."""
    db["aliases"].create(
        {"name": str, "collection": str, "previous_collection": str, "updated_at": float},
        pk="name", not_null={"collection", "previous_collection", "updated_at"},
        defaults={"previous_collection": ""},
        foreign_keys=[("collection", "collections", "name")],
    )
