"""Collection aliases: the rules both backends share (`AliasTable`).

An alias names a collection. Every RPC that takes a collection name takes an
alias instead: the servicer resolves it once per call (`resolve`, a SearchStream
once per name at its first query) and works on the collection from then on, so
an answer comes wholly from one collection even while the alias switches.
Aliases and collections share one namespace. A switch is atomic and may be
conditional (compare-and-swap on the current target); the target before the
last switch is kept for a roll-back. A collection an alias points to cannot be
dropped. Every change is logged at INFO with the old and new target.

A backend's table (sqlite/aliases.py, milvus/aliases.py) keeps the state; the
rules and their messages are here, once.
"""

from __future__ import annotations

import logging

from imagesearch import errors
from ranker_service.types import Alias, Target
from ranker_service.validation import check_collection, unknown_collection

log = logging.getLogger(__name__)


def taken(name: str, found: Alias | str) -> errors.AlreadyExists:
    """A new alias or collection cannot take `name`: it is a collection (`found` is its name) or an alias."""
    if isinstance(found, Alias):
        return errors.AlreadyExists(f"{name!r} is an alias of collection {found.collection!r}: aliases and "
                                    "collections share one namespace; pick another name (or SwitchAlias it)")
    return errors.AlreadyExists(f"{name!r} is a collection: aliases and collections share one namespace; "
                                "pick another name")


class AliasTable:
    """See the module docstring. A subclass gives `resolve(name) -> Target` (the
    collection `name` names: itself unless it is an alias, and its fingerprint),
    `list()` (every alias, by name), `_changing()` (a context in which no other
    alias or collection change of this ranker runs), `_lookup(name)` (the alias
    `name`, else `name` when it is a collection, else None), `_put(alias, new)`
    (store a new or switched alias, durably and atomically), `_remove(alias)` and
    `_collections()` (every collection's name, for messages)."""

    def resolve(self, name: str) -> Target:
        raise NotImplementedError

    def list(self) -> list[Alias]:
        raise NotImplementedError

    # ------------------------------------------------------------ changes

    def create(self, alias: str, collection: str) -> Alias:
        """A new alias of `collection`; the same call again is no error."""
        check_collection(alias, what="create alias", noun="alias")
        check_collection(collection, what=f"create alias {alias!r}")
        with self._changing():
            found = self._lookup(alias)
            if isinstance(found, Alias) and found.collection == collection:
                return found
            if found is not None:
                raise taken(alias, found)
            self._check_target(alias, collection)
            made = Alias(alias, collection)
            self._put(made, new=True)
            log.info("alias %r -> %r: created", alias, collection)
        return made

    def switch(self, alias: str, collection: str, expected: str = "") -> Alias:
        """Point `alias` at `collection`, if it points at `expected` now (unless that is "").
        A switch to its current target changes nothing: no error (a retried switch)."""
        check_collection(alias, what="switch alias", noun="alias")
        check_collection(collection, what=f"switch alias {alias!r}")
        with self._changing():
            current = self._alias(alias, "switch alias")
            self._check_target(alias, collection)
            if current.collection == collection:  # nothing to do (a retried switch too)
                return current
            if expected and current.collection != expected:
                raise errors.Aborted(
                    f"switch alias {alias!r}: it points to {current.collection!r}, not {expected!r} as expected "
                    "(another switch came first): read it again (ListAliases) and retry")
            switched = Alias(alias, collection, current.collection)
            self._put(switched, new=False)
            log.info("alias %r switched: %r -> %r", alias, current.collection, collection)
        return switched

    def drop(self, alias: str) -> None:
        check_collection(alias, what="drop alias", noun="alias")
        with self._changing():
            current = self._alias(alias, "drop alias")
            self._remove(current)
            log.info("alias %r (-> %r): dropped", alias, current.collection)

    # ------------------------------------------------------------ checks for collection changes

    def check_new_collection(self, collection: str) -> None:
        """A collection about to be made (the caller is changing): AlreadyExists when an alias has its name."""
        found = self._lookup(collection)
        if isinstance(found, Alias):
            raise taken(collection, found)

    def check_drop(self, collection: str) -> None:
        """A collection about to be dropped (the caller is changing): FailedPrecondition when
        `collection` is an alias, or an alias points to it."""
        found = self._lookup(collection)
        if isinstance(found, Alias):
            raise errors.FailedPrecondition(
                f"drop collection: {collection!r} is an alias of {found.collection!r}; drop the alias with "
                "DropAlias or the collection by its own name")
        pointing = [a.name for a in self.list() if a.collection == collection]
        if pointing:
            raise errors.FailedPrecondition(
                f"drop collection: alias {', '.join(map(repr, pointing))} points to collection {collection!r}: "
                "switch it to another collection (SwitchAlias) or drop it (DropAlias) first")

    # ------------------------------------------------------------ shared

    def _alias(self, alias: str, what: str) -> Alias:
        found = self._lookup(alias)
        if isinstance(found, Alias):
            return found
        if found is not None:
            raise errors.NotFound(f"{what}: {alias!r} is a collection, not an alias")
        names = [a.name for a in self.list()]
        listing = ", ".join(map(repr, names[:10])) + (" ..." if len(names) > 10 else "")
        raise errors.NotFound(f"{what}: unknown alias {alias!r} (aliases: {listing or 'none yet'}): "
                              "make it with CreateAlias")

    def _check_target(self, alias: str, collection: str) -> None:
        found = self._lookup(collection)
        if isinstance(found, Alias):
            raise errors.NotFound(f"alias {alias!r}: {collection!r} is an alias (of {found.collection!r}), not a "
                                  "collection: an alias points to a collection")
        if found is None:
            raise unknown_collection(collection, self._collections())

