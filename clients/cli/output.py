"""What the CLI tells its user on the terminal: messages on stderr, and the
summaries of an index or a query job (counts, then each failure with its
reason, grouped when one cause failed many files).

Text that comes from a service (item names, messages) or from file names is
made printable first: control characters (ESC, BEL, CR, newlines...) and
bidirectional overrides are shown as escapes, so a stored name cannot
retitle the terminal, erase lines or forge a line of output."""

from __future__ import annotations

import json
import sys
import unicodedata
from typing import Mapping, Sequence

from clients.cli.jobs import IndexReport, QueryReport
from clients.files import SYMLINK_OUT
from clients.types import Failure

# Invisible characters that reorder the text around them (the "Trojan Source" set).
_BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, *, keep_newlines: bool = False) -> str:
    """`text` with every control character (C0, DEL, C1) and bidirectional
    override written as a visible escape (`\\x1b`, `\\r`, `\\u202e`);
    `keep_newlines` leaves line breaks of a multi-line message alone."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if (ch == "\n" and keep_newlines) or
                   (unicodedata.category(ch) != "Cc" and ch not in _BIDI) else _escape(ch) for ch in text)


def json_text(data) -> str:
    """JSON for a terminal: non-ASCII text stays readable, and the characters
    json leaves raw (DEL, C1 controls, bidirectional overrides) become \\u escapes."""
    text = json.dumps(data, indent=1, ensure_ascii=False)
    return text if text.isprintable() else "".join(
        f"\\u{ord(ch):04x}" if unicodedata.category(ch) == "Cc" and ch != "\n" or ch in _BIDI else ch for ch in text)


def say(message: str) -> None:
    """A message on stderr; whatever was not escaped where it was put into
    the message is escaped here (line breaks kept)."""
    print(printable(message, keep_newlines=True), file=sys.stderr, flush=True)


def _names(names: Sequence[str]) -> str:
    return ", ".join(printable(n) for n in names[:10]) + (" ..." if len(names) > 10 else "")


def print_failures(title: str, failed: Mapping[str, Failure], skipped: Sequence[tuple[str, str]]) -> None:
    outside = [name for name, why in skipped if why == SYMLINK_OUT]
    others = [name for name, why in skipped if why != SYMLINK_OUT]
    if others:
        say(f"{len(others)} files skipped (not images): {_names(others)}")
    if outside:
        say(f"{len(outside)} symlinks out of the folder skipped (--follow-symlinks includes them): {_names(outside)}")
    if failed:
        say(f"{len(failed)} images {title}:")
        by_reason: dict[str, list[str]] = {}
        for name, failure in sorted(failed.items()):
            by_reason.setdefault(printable(failure), []).append(printable(name))
        for why, names in by_reason.items():
            if len(names) == 1:
                say(f"  {names[0]}: {why}")
            else:  # one cause (a service error, say) for many files: said once
                say(f"  {len(names)} images: {why}")
                for name in names:
                    say(f"    {name}")


def index_summary(r: IndexReport) -> None:
    say(f"indexed {r.done} of {r.total_images} images from {r.folder} into collection {r.collection!r} "
        f"({r.inserted} new, {r.replaced} replaced) in {r.seconds:.1f}s")
    say(f"  {r.unchanged} unchanged, {r.renamed} renamed, {r.retagged} with new attributes (not embedded); "
        f"{r.hashed} files hashed")
    if r.gone:
        if r.deleted:
            say(f"  {r.deleted} items whose files are gone were deleted (--sync)")
        else:
            say(f"  {len(r.gone)} items whose files are gone are still in the collection (--sync deletes them): "
                f"{_names(r.gone)}")
    if r.vanished:
        say(f"  {len(r.vanished)} files were removed or renamed while the run read the folder "
            f"(the next run picks up what is there then): {_names(r.vanished)}")
    print_failures("not indexed", r.failed, r.skipped)
    if r.failed:
        say("run the same `imagesearch index` again to complete the gallery once the cause is fixed "
            "(it resumes: what was indexed is not embedded again)")


def query_summary(r: QueryReport) -> None:
    say(f"answered {r.done} of {r.total_images} queries from {r.folder} (top {r.top_k} of collection "
        f"{r.collection!r}) in {r.seconds:.1f}s")
    print_failures("not answered", r.failed, r.skipped)
