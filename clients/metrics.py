"""Retrieval metrics for `{query: [ranked gallery names]}` results against
`{query: [relevant gallery names]}` ground truth.

The per-ranking figures (AP@k, precision@k, recall@k, top-1) are defined
once, in imagesearch.retrieval_metrics; mAP@k and the others here are their
means over queries. Queries whose ground truth is empty are left out of the
means and counted apart."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

from clients.errors import UsageError
from clients.files import list_images
from imagesearch.retrieval_metrics import average_precision, precision_at_k, recall_at_k, top1  # noqa: F401


@dataclasses.dataclass(frozen=True)
class QueryScore:
    query: str
    ap: float
    precision: float
    recall: float
    top1: float
    relevant: int
    answered: bool


@dataclasses.dataclass(frozen=True)
class Evaluation:
    k: int
    queries: int              # queries scored (ground truth with at least one relevant item)
    map: float
    precision: float
    recall: float
    top1: float
    missing: list[str]        # ground-truth queries absent from the results (scored 0)
    no_relevant: list[str]    # ground-truth queries with no relevant items (left out)
    per_query: list[QueryScore]

    def to_dict(self) -> dict:
        return {
            "k": self.k, "queries": self.queries,
            f"map@{self.k}": self.map, f"precision@{self.k}": self.precision,
            f"recall@{self.k}": self.recall, "top1": self.top1,
            "missing": self.missing, "no_relevant": self.no_relevant,
            "per_query": [dataclasses.asdict(q) for q in self.per_query],
        }


def evaluate(results: Mapping[str, Sequence[str]], ground_truth: Mapping[str, Sequence[str]],
             k: int = 10) -> Evaluation:
    """Score `results` against `ground_truth`. Every query in the results must
    be in the ground truth (UsageError otherwise); ground-truth queries absent
    from the results score 0 and are listed in `missing`."""
    if k < 1:
        raise UsageError(f"--k must be at least 1 (got {k})")
    unknown = sorted(set(results) - set(ground_truth))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise UsageError(
            f"{len(unknown)} of {len(results)} queries in the results are not in the ground truth: {shown}. "
            "Check that both files use the same query names (paths relative to the query folder)")
    scores, missing, no_relevant = [], [], []
    for query in sorted(ground_truth):
        relevant = set(ground_truth[query])
        if not relevant:
            no_relevant.append(query)
            continue
        ranked = results.get(query)
        if ranked is None:
            missing.append(query)
            scores.append(QueryScore(query, 0.0, 0.0, 0.0, 0.0, len(relevant), False))
            continue
        scores.append(QueryScore(query, average_precision(ranked, relevant, k), precision_at_k(ranked, relevant, k),
                                 recall_at_k(ranked, relevant, k), top1(ranked, relevant), len(relevant), True))
    n = len(scores)

    def mean(field: str) -> float:
        return sum(getattr(s, field) for s in scores) / n if n else 0.0

    return Evaluation(k, n, mean("ap"), mean("precision"), mean("recall"), mean("top1"), missing, no_relevant, scores)


def format_table(ev: Evaluation, title: str = "") -> str:
    rows = [(f"mAP@{ev.k}", ev.map), (f"precision@{ev.k}", ev.precision), (f"recall@{ev.k}", ev.recall),
            ("top-1", ev.top1)]
    lines = [title] if title else []
    lines.append(f"{'metric':<14} {'value':>7}")
    lines.extend(f"{name:<14} {value:>7.4f}" for name, value in rows)
    lines.append(f"{'queries':<14} {ev.queries:>7d}")
    if ev.missing:
        lines.append(f"{len(ev.missing)} ground-truth queries had no results and scored 0: "
                     + ", ".join(ev.missing[:5]) + (" ..." if len(ev.missing) > 5 else ""))
    if ev.no_relevant:
        lines.append(f"{len(ev.no_relevant)} ground-truth queries list no relevant items and were left out")
    return "\n".join(lines)


# ---------------------------------------------------------------- files


def _load_json(path: str | os.PathLike, what: str):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} file {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"the {what} file {path} is not UTF-8 text (is it JSON?)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"the {what} file {path} is not valid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from None


def validate_mapping(data, source: str, what: str) -> dict[str, list[str]]:
    """`{str: [str, ...]}` or a UsageError naming the first bad entry."""
    if not isinstance(data, dict):
        raise UsageError(f"{source}: the {what} must be a JSON object {{query file: [gallery files]}}, "
                         f"not a {type(data).__name__}")
    out: dict[str, list[str]] = {}
    for query, names in data.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UsageError(f"{source}: the {what} entry for {query!r} must be a list of gallery file names "
                             f"(strings), got {json.dumps(names)[:80]}")
        out[query] = names
    return out


def load_results(path: str | os.PathLike) -> dict[str, list[str]]:
    return validate_mapping(_load_json(path, "results"), str(path), "results")


def load_ground_truth(path: str | os.PathLike) -> dict[str, list[str]]:
    return validate_mapping(_load_json(path, "ground-truth"), str(path), "ground truth")


def labels_from_folders(query_dir: str | os.PathLike, gallery_dir: str | os.PathLike, *,
                        follow_symlinks: bool = False) -> dict[str, list[str]]:
    """Ground truth from class folders: `query/<class>/x.jpg` is relevant to
    every `gallery/<class>/...` image. Names are relative to each folder."""
    def classes(folder, role: str) -> list[tuple[str, str]]:
        """(image name, its class folder) of every image under `folder`."""
        found = []
        for name, _ in list_images(folder, what=f"{role} folder", follow_symlinks=follow_symlinks).images:
            if "/" not in name:
                raise UsageError(f"--labels-from-folders: {role} image {name} is not inside a class folder "
                                 f"(expected {folder}/<class>/{name})")
            found.append((name, name.split("/", 1)[0]))
        return found

    by_class: dict[str, list[str]] = {}
    for name, label in classes(gallery_dir, "gallery"):
        by_class.setdefault(label, []).append(name)
    truth = {name: by_class.get(label, []) for name, label in classes(query_dir, "query")}
    if not truth:
        raise UsageError(f"--labels-from-folders: no images under {query_dir}")
    return truth
