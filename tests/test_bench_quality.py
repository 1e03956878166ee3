"""bench/quality.py's bookkeeping, run as its users run it (tests never import
bench): bad options and seeds are refused, each base and seed names its own
run, and a measured row names the queries whose first hit it gets wrong. The
figures themselves are the bench's job."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/quality.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)


def test_bad_seeds_and_options_are_refused():
    for seeds, message in (("7,7", "distinct seeds"), ("4a", "whole numbers")):
        done = bench("--seeds", seeds)
        assert done.returncode == 2 and message in done.stderr
    for option in ("default+fast", "default+fused-a", "default+w1.5", "default+w0.3+w0.5",
                   "off-the-shelf+w0.5"):
        done = bench("--options", option)
        assert done.returncode != 0 and f"unknown option '{option}'" in done.stderr


def test_each_base_and_seed_names_its_own_run(tmp_path):
    data = tmp_path / "data"
    (data / "retrieval").mkdir(parents=True)
    (data / "retrieval" / "ground_truth.json").write_text(json.dumps({}))
    runs = tmp_path / "runs"
    runs.mkdir()
    out = tmp_path / "quality.json"
    done = bench("--data", str(data), "--runs", str(runs), "--out", str(out), "--options",
                 "default,lite2,lr3e-4,default+w0.5", "--seeds", "42,7")
    assert done.returncode == 0, done.stderr
    left_out = json.loads(out.read_text())["left_out"]
    named = {line.split(" ")[0]: Path(line.split(" at ")[1].split(";")[0]).name for line in left_out}
    assert set(named) == {"default@42", "default@7", "lite2@42", "lite2@7", "lr3e-4@42", "lr3e-4@7",
                          "default+w0.5@42", "default+w0.5@7"}
    # A fusion modifier serves the base's own run.
    assert named.pop("default+w0.5@7") == named["default@7"]
    named.pop("default+w0.5@42")
    # The trainer's default seed keeps the plain name; another seed says so; the keys differ
    # (lr3e-4, the default recipe at its former peak, is a model of its own, not today's default).
    assert named["default@42"].startswith("default-") and "seed" not in named["default@42"]
    assert named["default@7"].startswith("default-seed7-") and named["lite2@7"].startswith("lite2-seed7-")
    assert len({name.rsplit("-", 1)[1] for name in named.values()}) == 6


def test_rows_name_the_queries_whose_first_hit_is_wrong(tmp_path, clothing_dir):
    """A tiny real retrieval split, measured off the shelf through the real
    services: a hat whose ground truth names shoes cannot get its first hit
    right, and the row and the summary say which query missed."""
    labels = {}
    with open(clothing_dir / "retrieval" / "labels.csv", newline="") as f:
        for line in csv.DictReader(f):
            labels.setdefault((line["split"], line["class"]), []).append(line["file"])
    retrieval = tmp_path / "data" / "retrieval"
    for split in ("query", "gallery"):
        (retrieval / split).mkdir(parents=True)
    gallery = {label: sorted(labels[("gallery", label)])[:3] for label in ("shoes", "pants", "hat")}
    for names in gallery.values():
        for name in names:
            shutil.copy(clothing_dir / "retrieval" / "gallery" / name, retrieval / "gallery" / name)
    queries = {label: sorted(labels[("query", label)])[0] for label in ("shoes", "pants", "hat")}
    for name in queries.values():
        shutil.copy(clothing_dir / "retrieval" / "query" / name, retrieval / "query" / name)
    truth = {queries["shoes"]: gallery["shoes"], queries["pants"]: gallery["pants"], queries["hat"]: gallery["shoes"]}
    (retrieval / "ground_truth.json").write_text(json.dumps(truth))
    out = tmp_path / "quality.json"
    done = bench("--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"), "--out", str(out),
                 "--options", "off-the-shelf")
    assert done.returncode == 0, done.stderr
    row = json.loads(out.read_text())["rows"][0]
    assert queries["hat"] in row["top1_missed"] and set(row["top1_missed"]) <= set(truth)
    assert len(row["top1_missed"]) == round((1 - row["top1"]) * row["queries"])
    assert f"  {queries['hat']}  1/1" in done.stdout.split("first hit is wrong")[1]
