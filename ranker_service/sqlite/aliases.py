"""The SQLite backend's aliases (`SqliteAliases`, the rules in
ranker_service/aliases.py): the `aliases` table beside the collections
(migrations.m002; so a Backup carries them), each change one transaction
(after kill -9 an alias points to exactly one collection, the one of its last
acknowledged change or of the change in flight), and a dict of it in memory.

Changes run under the backend's write lock, which collection changes hold too:
a collection cannot be dropped while an alias is made to point to it.
Resolution is one lookup in the dict, which a change replaces whole (so a
reader never sees it half changed) after its transaction committed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from imagesearch import errors
from ranker_service.aliases import AliasTable
from ranker_service.types import Alias, Target


class SqliteAliases(AliasTable):
    def __init__(self, backend):
        self._backend = backend
        self._by_name: dict[str, Alias] = {}

    def load(self) -> None:
        self._by_name = {name: Alias(name, collection, previous)
                         for name, collection, previous in self._backend.store.aliases()}

    def resolve(self, name: str) -> Target:
        alias = self._by_name.get(name)
        target = name if alias is None else alias.collection
        coll = self._backend.index.find(target)
        return Target(target, "" if coll is None else coll.fingerprint)

    def list(self) -> list[Alias]:
        self._backend._require_ready()
        return [a for _, a in sorted(self._by_name.items())]

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        backend = self._backend
        backend._require_ready()
        with backend._write_lock:
            if backend._closed:
                raise errors.Unavailable("the ranker is shutting down")
            yield

    def _lookup(self, name: str) -> Alias | str | None:
        alias = self._by_name.get(name)
        if alias is not None:
            return alias
        return name if name in self._backend.index else None

    def _put(self, alias: Alias, new: bool) -> None:
        self._backend.store.set_alias(alias.name, alias.collection, alias.previous)
        self._by_name = {**self._by_name, alias.name: alias}

    def _remove(self, alias: Alias) -> None:
        self._backend.store.drop_alias(alias.name)
        self._by_name = {n: a for n, a in self._by_name.items() if n != alias.name}

    def _collections(self) -> list[str]:
        return self._backend.index.collection_names()
