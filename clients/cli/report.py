"""A self-contained HTML report: each query with its top-k matches as small
base64 JPEG thumbnails, their scores, and (given ground truth) the relevant
ones marked. One file, no external links, opens in any browser."""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path
from typing import Mapping, Sequence

from clients.files import file_inside, thumbnail_jpeg
from clients.metrics import Evaluation, QueryScore
from clients.types import Failure, Match

log = logging.getLogger(__name__)

THUMB_PX = 112


def thumbnail_data_uri(path: Path, size: int = THUMB_PX) -> str | None:
    """A small JPEG of the image as a data: URI, or None when it cannot be read."""
    data = thumbnail_jpeg(path, size)
    return None if data is None else "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} table.metrics td,table.metrics th{padding:.2em .8em;text-align:right}
.query{display:flex;gap:.6em;align-items:flex-start;border-top:1px solid #ddd;padding:.6em 0}
.cell{width:%(px)dpx;font-size:.72em;word-break:break-all;text-align:center}
.cell img,.ph{width:%(px)dpx;height:%(px)dpx;object-fit:contain;background:#f3f3f3;border:3px solid transparent;display:block}
.q img,.q .ph{border-color:#36c}
.rel img,.rel .ph{border-color:#2a2}
.irr img,.irr .ph{border-color:#d33}
.ph{display:flex;align-items:center;justify-content:center;color:#888}
.score{font-weight:600}
.ap{font-size:.8em;color:#555}
"""


def render(title: str, queries: Sequence[tuple[str, Sequence[Match]]], *,
           query_root: Path | None = None, gallery_root: Path | None = None,
           ground_truth: Mapping[str, Sequence[str]] | None = None,
           evaluation: Evaluation | None = None, failures: Mapping[str, Failure | str] | None = None,
           notes: Sequence[str] = ()) -> str:
    """The report as one HTML string. `queries`: (query name, its matches) in
    display order; thumbnails come from `query_root / name` and `gallery_root / name`,
    only for regular files inside those folders: a name (from the ranker) with
    `..`, an absolute name or a symlink that leads out of its folder gets no
    thumbnail, so no other file of the user's is ever read into the report."""
    cache: dict[str, str | None] = {}

    def thumb(root: Path | None, name: str, key: str) -> str | None:
        if root is None:
            return None
        if key not in cache:
            path = file_inside(root, name)
            if path is None:
                log.debug("no thumbnail for %r: not a file inside %s", name, root)
            cache[key] = None if path is None else thumbnail_data_uri(path)
        return cache[key]

    def cell(uri: str | None, caption: str, css: str, tooltip: str) -> str:
        img = (f'<img src="{uri}" alt="{html.escape(tooltip)}">' if uri
               else f'<div class="ph">{html.escape(tooltip.rsplit("/", 1)[-1][:14])}</div>')
        return f'<div class="cell {css}" title="{html.escape(tooltip)}">{img}{caption}</div>'

    per_query: dict[str, QueryScore] = {q.query: q for q in evaluation.per_query} if evaluation else {}
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           f"<style>{_STYLE % {'px': THUMB_PX}}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for note in notes:
        out.append(f"<p>{html.escape(note)}</p>")
    if evaluation is not None:
        k = evaluation.k
        out.append("<table class='metrics'><tr><th>queries</th>"
                   f"<th>mAP@{k}</th><th>precision@{k}</th><th>recall@{k}</th><th>top-1</th></tr>")
        out.append(f"<tr><td>{evaluation.queries}</td><td>{evaluation.map:.4f}</td><td>{evaluation.precision:.4f}</td>"
                   f"<td>{evaluation.recall:.4f}</td><td>{evaluation.top1:.4f}</td></tr></table>")
        out.append("<p>Green border: relevant; red: not relevant (by the ground truth).</p>")
    for query, matches in queries:
        relevant = set(ground_truth.get(query, ())) if ground_truth is not None else None
        score = per_query.get(query)
        caption = f"<div>{html.escape(query)}</div>"
        if score is not None:
            caption += f"<div class='ap'>AP {score.ap:.3f} &middot; P {score.precision:.2f}</div>"
        out.append(f'<div class="query" data-query="{html.escape(query)}">')
        out.append(cell(thumb(query_root, query, "q:" + query), caption, "q", query))
        for m in matches:
            css = "" if relevant is None else ("rel" if m.name in relevant else "irr")
            cap = (f"<div>#{m.rank} <span class='score'>{m.score:.3f}</span></div>"
                   f"<div>{html.escape(m.name)}</div>")
            out.append(cell(thumb(gallery_root, m.name, "g:" + m.name), cap, css, m.name))
        out.append("</div>")
    if failures:
        out.append(f"<h2>Not answered ({len(failures)})</h2><ul>")
        out.extend(f"<li>{html.escape(name)}: {html.escape(str(why))}</li>" for name, why in sorted(failures.items()))
        out.append("</ul>")
    out.append("</body></html>")
    return "\n".join(out)
