"""The Milvus backend's aliases (`MilvusAliases`; the rules are
ranker_service/aliases.py's).

Our alias `a` is Milvus's own alias `milvus_name(a)` (`create_alias`,
`alter_alias`, `drop_alias`), in the namespace of Milvus's collection names as
ours share one with our collections. So the `describe_collection` that every
call makes already resolves a name to its collection (MilvusBackend._find), in
one Milvus call: one code path for milvus-lite and a server, other rankers on
the same Milvus see a switch on their next call, and other Milvus clients see
the aliases too. What Milvus does not keep, the target before the last switch,
is a row per alias in the Milvus collection `ALIASES`, kept as the collections'
settings are. (`describe_alias` and `list_aliases` are not used: the 2.3.5
server answers them for the default database only.)

Changes run under the backend's lock, so compare-and-swap holds among the
callers of one ranker; rankers sharing a Milvus do not see each other's lock
(Milvus has no conditional `alter_alias`). The writes are ordered so that a
crash between two leaves every alias right: a new alias's row first, then the
Milvus alias (a row without one is ignored, and overwritten by the next
create); a switch's Milvus alias first, then its row (a row naming another
target than Milvus's is one switch behind: its target is the previous one); a
drop's Milvus alias first, then its row.
"""

from __future__ import annotations

import json

from ranker_service.aliases import AliasTable
from ranker_service.milvus.schema import ALIASES, CONSISTENCY, milvus_name
from ranker_service.types import Alias, Target


class MilvusAliases(AliasTable):
    def __init__(self, backend):
        self._backend = backend

    def resolve(self, name: str) -> Target:
        coll = self._backend._find(name)
        return Target(name) if coll is None else Target(coll.name, coll.fingerprint)

    def list(self) -> list[Alias]:
        backend = self._backend
        backend._require_ready()
        found = []
        for name, row in sorted(self._rows().items()):
            coll = backend._find(name)
            if coll is not None and coll.name != name:
                found.append(_with_row(name, coll.name, row))
        return found

    def _rows(self, name: str | None = None) -> dict[str, dict]:
        if name is None:
            rows = self._backend._call("reading aliases", "query", ALIASES, filter='key != ""',
                                       output_fields=["settings"], consistency_level=CONSISTENCY)
        else:
            rows = self._backend._call("reading an alias", "get", ALIASES, ids=[milvus_name(name)],
                                       output_fields=["settings"], consistency_level=CONSISTENCY)
        return {s["alias"]: s for s in (json.loads(r["settings"]) for r in rows)}

    def _changing(self):
        self._backend._require_ready()
        return self._backend._lock

    def _lookup(self, name: str) -> Alias | str | None:
        coll = self._backend._find(name)
        if coll is None or coll.name == name:
            return None if coll is None else name
        return _with_row(name, coll.name, self._rows(name).get(name))

    def _put(self, alias: Alias, new: bool) -> None:
        call, key = self._backend._call, milvus_name(alias.name)
        row = {"key": key, "settings": json.dumps({"alias": alias.name, "collection": alias.collection,
                                                   "previous": alias.previous}), "v": [1.0, 0.0]}
        if new:
            call(f"saving alias {alias.name!r}", "upsert", ALIASES, [row])
        call(f"pointing alias {alias.name!r} at {alias.collection!r}", "create_alias" if new else "alter_alias",
             milvus_name(alias.collection), key)
        if not new:
            call(f"saving alias {alias.name!r}", "upsert", ALIASES, [row])

    def _remove(self, alias: Alias) -> None:
        key = milvus_name(alias.name)
        self._backend._call(f"dropping alias {alias.name!r}", "drop_alias", key)
        self._backend._call(f"dropping alias {alias.name!r}", "delete", ALIASES, ids=[key])

    def _collections(self) -> list[str]:
        return [c.name for c in self._backend._all()]


def _with_row(name: str, target: str, row: dict | None) -> Alias:
    """The alias Milvus points at `target`, with its row (None: none was saved)."""
    if row is None:
        return Alias(name, target)
    return Alias(name, target, row["previous"] if row["collection"] == target else row["collection"])
