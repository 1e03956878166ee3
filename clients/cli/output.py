"""What the CLI tells its user on the terminal: messages on stderr, and the
summaries of an index or a query job (counts, then each failure with its
reason, grouped when one cause failed many files)."""

from __future__ import annotations

import sys
from typing import Mapping, Sequence

from clients.cli.jobs import IndexReport, QueryReport
from clients.types import Failure


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_failures(title: str, failed: Mapping[str, Failure], skipped: Sequence[tuple[str, str]]) -> None:
    if skipped:
        shown = ", ".join(name for name, _ in skipped[:10])
        say(f"{len(skipped)} files skipped (not images): {shown}{' ...' if len(skipped) > 10 else ''}")
    if failed:
        say(f"{len(failed)} images {title}:")
        by_reason: dict[str, list[str]] = {}
        for name, failure in sorted(failed.items()):
            by_reason.setdefault(str(failure), []).append(name)
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
    print_failures("not indexed", r.failed, r.skipped)
    if r.failed:
        say("run the same `imagesearch index` again to complete the gallery once the cause is fixed "
            "(indexed images are replaced, never duplicated)")


def query_summary(r: QueryReport) -> None:
    say(f"answered {r.done} of {r.total_images} queries from {r.folder} (top {r.top_k} of collection "
        f"{r.collection!r}) in {r.seconds:.1f}s")
    print_failures("not answered", r.failed, r.skipped)
