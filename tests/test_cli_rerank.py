"""The CLI's re-ranking flags: `--query-expansion N[:ALPHA]` and `--rerank
k-reciprocal` (query, search, run): their parsing and usage errors, and `run`
end to end through real services with both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clients import cli, metrics
from clients.cli import commands
from clients.cli.parser import build_parser
from clients.types import KReciprocal, QueryExpansion
from tests.helpers import make_photo_set

ROOT = Path(__file__).resolve().parents[1]


def test_flags_parse_into_the_library_options():
    args = build_parser().parse_args(["query", "q", "--query-expansion", "3:0.5", "--rerank", "k-reciprocal"])
    assert commands._rerank(args) == {"query_expansion": QueryExpansion(3, 0.5), "k_reciprocal": KReciprocal()}
    args = build_parser().parse_args(["search", "x.jpg", "--query-expansion", "2"])
    assert commands._rerank(args) == {"query_expansion": QueryExpansion(2, None), "k_reciprocal": None}
    args = build_parser().parse_args(["run", "--gallery", "g", "--query", "q"])
    assert commands._rerank(args) == {"query_expansion": None, "k_reciprocal": None}


@pytest.mark.parametrize("argv, text", [
    (["query", "q", "--query-expansion", "two"], "--query-expansion takes N or N:ALPHA"),
    (["query", "q", "--query-expansion", "0"], "N must be 1..100"),
    (["query", "q", "--query-expansion", "2:-1"], "ALPHA 0..100"),
])
def test_bad_flags_are_usage_errors(tmp_path, capsys, argv, text):
    (tmp_path / "q").mkdir()
    (tmp_path / "g").mkdir()
    argv = [str(tmp_path / a) if a in ("q", "g") else a for a in argv]
    assert cli.main([*argv, "--embedder", "127.0.0.1:1", "--ranker", "127.0.0.1:1"]) == 2
    assert text in capsys.readouterr().err


def test_run_with_query_expansion_and_k_reciprocal(tmp_path):
    gallery, query, truth = make_photo_set(tmp_path)
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(truth))
    out, db = tmp_path / "results.json", tmp_path / "g.db"
    env = {**os.environ, "IMAGESEARCH_TORCH_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    env.pop("IMAGESEARCH_EMBEDDER", None)
    env.pop("IMAGESEARCH_RANKER", None)
    proc = subprocess.run(
        [sys.executable, "-m", "clients.cli", "run", "--gallery", str(gallery), "--query", str(query), "--out",
         str(out), "--ground-truth", str(gt), "--top-k", "3", "--no-progress", "--no-html", "--db", str(db),
         "--query-expansion", "1:0", "--rerank", "k-reciprocal"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(truth) and all(len(v) == 3 for v in results.values())
    assert metrics.evaluate(results, truth, k=3).top1 >= 0.8, proc.stdout
