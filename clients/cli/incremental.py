"""What an `imagesearch index` re-run has to do: compare the folder with what
the collection holds and sort every file into one of five piles.

Each indexed item carries its file's `sha256`, `size` and `mtime` (ns) as
attributes, with whatever attributes the run adds (`--attributes`,
`--attributes-from-folders`). For each image file:

- same name, same size and mtime, same extra attributes: **unchanged**
  (not even hashed);
- same name, size and mtime differ but the content hash is the same (a
  `touch`, a copy that kept the bytes), or only the extra attributes differ:
  **retag** (its stored vector is upserted again with the new attributes; no
  embedding);
- same name, other content: **embed** (changed);
- a new name whose (sha256, size) is that of an item whose file is gone:
  **rename** (the Rename RPC re-keys it; no embedding);
- any other new name: **embed** (new).

Items whose files are gone (and were not renamed) are **gone**: `--sync`
deletes them. Items stored without a `sha256` (indexed by another tool) are
embedded again once, to get their attributes.

The folder can change while a run reads it. A listed file that is gone when
it is looked at is **vanished**: treated as not in the folder (its stored
item is gone too). One that cannot be read (permissions, I/O) is
**unreadable**: reported with its reason, its stored item left alone. A file
renamed or added after the listing is picked up by the next run, so `--sync`
converges: a run over a folder that stopped changing changes nothing more.

An interrupted run needs nothing special: every chunk the ranker
acknowledged is stored with its attributes, so the next run finds those
files unchanged and embeds only the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath

from clients.errors import UsageError
from clients.files import FILE_KEYS, MTIME, SHA256, SIZE
from clients.types import StoredItem
from imagesearch.files import sha256_file

CLASS = "class"


def extra_attributes(fixed: Mapping[str, str], from_folders: bool) -> Callable[[str], dict[str, str]]:
    """The attributes a run adds to the item named `name` (a posix path
    relative to the gallery): `fixed`, plus `class` = the parent folder."""
    reserved = sorted(set(fixed) & set(FILE_KEYS))
    if reserved:
        raise UsageError(f"--attributes cannot set {', '.join(reserved)}: index keeps them itself")
    if from_folders and CLASS in fixed:
        raise UsageError("--attributes class=... and --attributes-from-folders both set `class`: pick one")

    def extra(name: str) -> dict[str, str]:
        attrs = dict(fixed)
        if from_folders:
            parent = PurePosixPath(name).parent.name
            if parent:
                attrs[CLASS] = parent
        return attrs

    return extra


@dataclasses.dataclass
class Plan:
    embed: list[tuple[str, Path]] = dataclasses.field(default_factory=list)    # new or changed files
    unchanged: list[str] = dataclasses.field(default_factory=list)
    retag: list[str] = dataclasses.field(default_factory=list)                # same content, new attributes
    renames: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (stored name, file name)
    gone: list[str] = dataclasses.field(default_factory=list)                 # stored, file gone
    attributes: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # for embed, retag, renames
    vanished: list[str] = dataclasses.field(default_factory=list)             # listed, gone when looked at
    unreadable: dict[str, str] = dataclasses.field(default_factory=dict)      # name -> why it cannot be read
    hashed: int = 0


def make_plan(images: list[tuple[str, Path]], stored: Mapping[str, StoredItem],
              extra: Callable[[str], dict[str, str]], *, full: bool = False) -> Plan:
    """Sort `images` ((name, path), as listed) against the `stored` items of
    the collection (by name, without vectors). `full`: embed every file."""
    plan = Plan()
    fresh: list[tuple[str, Path, dict[str, str]]] = []
    for name, path in images:
        try:
            _sort(plan, fresh, name, path, stored.get(name), extra, full)
        except FileNotFoundError:
            plan.vanished.append(name)
        except OSError as exc:
            plan.unreadable[name] = f"cannot read {name}: {exc.strerror or exc}"
    local = {name for name, _ in images} - set(plan.vanished)
    gone = [n for n in sorted(stored) if n not in local]
    by_content: dict[tuple[str, str], list[str]] = {}
    for n in gone:
        a = stored[n].attributes
        if SHA256 in a:
            by_content.setdefault((a[SHA256], a.get(SIZE, "")), []).append(n)
    renamed = set()
    for name, path, want in fresh:
        olds = by_content.get((want[SHA256], want[SIZE]))
        if olds:
            old = olds.pop(0)
            renamed.add(old)
            plan.renames.append((old, name))
            if stored[old].attributes != want:
                plan.retag.append(name)
        else:
            plan.embed.append((name, path))
    plan.gone = [n for n in gone if n not in renamed]
    return plan


def _sort(plan: Plan, fresh: list, name: str, path: Path, item: StoredItem | None,
          extra: Callable[[str], dict[str, str]], full: bool) -> None:
    """Put one listed file on its pile (new names go to `fresh`, matched
    against gone items for renames afterwards). Raises OSError when the
    file cannot be looked at, leaving `plan` untouched."""
    st = path.stat()
    size, mtime = str(st.st_size), str(st.st_mtime_ns)
    old = item.attributes if item is not None else {}
    if full or SHA256 not in old:
        digest = sha256_file(path)
        plan.hashed += 1
        want = {**extra(name), SHA256: digest, SIZE: size, MTIME: mtime}
        plan.attributes[name] = want
        if item is None and not full:
            fresh.append((name, path, want))
        else:
            plan.embed.append((name, path))
        return
    if old.get(SIZE) == size and old.get(MTIME) == mtime:
        want = {**extra(name), SHA256: old[SHA256], SIZE: size, MTIME: mtime}
        if want == old:
            plan.unchanged.append(name)
        else:
            plan.attributes[name] = want
            plan.retag.append(name)
        return
    digest = sha256_file(path)
    plan.hashed += 1
    want = {**extra(name), SHA256: digest, SIZE: size, MTIME: mtime}
    plan.attributes[name] = want
    if digest == old[SHA256] and old.get(SIZE) == size:
        plan.retag.append(name)
    else:
        plan.embed.append((name, path))
