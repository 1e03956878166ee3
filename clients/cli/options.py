"""Option values the commands and the web page both parse: N[:ALPHA] and the
re-ranking options of a search (docs/ranker.md#re-ranking)."""

from __future__ import annotations

from clients.errors import UsageError
from clients.types import KReciprocal, QueryExpansion

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
