"""Search options and answers as text, for the CLI and the web page alike:
N[:ALPHA], the re-ranking options of a search (docs/ranker.md#re-ranking),
KEY=VALUE pairs, a minimum score, and a match as JSON."""

from __future__ import annotations

from collections.abc import Iterable

from clients.errors import UsageError
from clients.types import KReciprocal, Match, QueryExpansion

RERANK_CHOICES = ("k-reciprocal",)


def n_alpha(text: str | None, flag: str) -> tuple[int, float | None] | None:
    """N[:ALPHA] -> (N, ALPHA or None); None when the option is absent."""
    if text is None:
        return None
    head, _, tail = text.partition(":")
    try:
        n = int(head)
        alpha = float(tail) if tail else None
    except ValueError:
        raise UsageError(f"{flag} takes N or N:ALPHA (e.g. 2 or 2:3), not {text!r}") from None
    if not 1 <= n <= 100 or (alpha is not None and not 0 <= alpha <= 100):
        raise UsageError(f"{flag} {text}: N must be 1..100 and ALPHA 0..100")
    return n, alpha


def rerank_options(query_expansion: str | None, rerank: str | None, *,
                   flags: tuple[str, str] = ("--query-expansion", "--rerank")) -> dict:
    """RankerClient.search keyword arguments of a query expansion N[:ALPHA]
    and a re-ranking method (None or one of RERANK_CHOICES)."""
    if rerank is not None and rerank not in RERANK_CHOICES:
        raise UsageError(f"{flags[1]} takes {' or '.join(RERANK_CHOICES)}, not {rerank!r}")
    qe = n_alpha(query_expansion, flags[0])
    return {"query_expansion": QueryExpansion(*qe) if qe else None,
            "k_reciprocal": KReciprocal() if rerank == "k-reciprocal" else None}


def parse_pairs(pairs: Iterable[str], flag: str) -> dict[str, list[str]]:
    """`k=v` strings into {k: [v, ...]} (a key given again adds a value)."""
    out: dict[str, list[str]] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} takes KEY=VALUE, got {pair!r}")
        out.setdefault(key, []).append(value)
    return out


def above(matches: list[Match], min_score: float | None) -> list[Match]:
    """The matches scoring at least `min_score` (all when None)."""
    return matches if min_score is None else [m for m in matches if m.score >= min_score]


def match_json(m: Match) -> dict:
    """One match as `imagesearch search --json` and the web page's API give it."""
    return {"rank": m.rank, "name": m.name, "score": round(m.score, 6), "attributes": m.attributes}
