"""The `imagesearch` CLI: evaluate's checks and exit codes, the HTML report,
usage errors before any service is contacted, and (slow) `run` end to end
through real embedder and ranker processes on small real photos."""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clients import cli, metrics
from clients.cli import demo, report
from clients.types import Match
from tests.helpers import make_photo_set

ROOT = Path(__file__).resolve().parents[1]


class ReportParser(html.parser.HTMLParser):
    """Collects the report's queries, images and cell classes."""

    def __init__(self):
        super().__init__()
        self.queries: list[str] = []
        self.images: list[str] = []
        self.cells: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and "data-query" in a:
            self.queries.append(a["data-query"])
        if tag == "div" and "cell" in (a.get("class") or "").split():
            self.cells.append(a.get("class"))
        if tag == "img":
            self.images.append(a.get("src", ""))


def parse_report(text: str) -> ReportParser:
    p = ReportParser()
    p.feed(text)
    p.close()
    return p


def test_cli_imports_only_the_contracts():
    """clients -> contracts: no torch, no service or trainer code (the CLI starts fast)."""
    code = ("import sys, clients.cli.parser, clients.cli.commands, clients.cli.jobs, clients.cli.services; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'torchvision', 'timm', 'embedder_service', 'ranker_service', 'trainer', 'bench'}); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- evaluate


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_evaluate_prints_the_table(tmp_path, capsys):
    results = write_json(tmp_path / "r.json", {"q1": ["a", "x", "b"], "q2": ["x", "c"]})
    truth = write_json(tmp_path / "gt.json", {"q1": ["a", "b"], "q2": ["c"]})
    assert cli.main(["evaluate", str(results), "--ground-truth", str(truth), "--k", "2"]) == 0
    out = capsys.readouterr().out
    # q1: AP@2 .5, q2: AP@2 .5; P@2 .5 each; R@2 .5 and 1; top-1 1 and 0
    assert "mAP@2" in out and "0.5000" in out and "0.7500" in out
    assert cli.main(["evaluate", str(results), "--ground-truth", str(truth), "--k", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["map@2"] == pytest.approx(0.5) and data["recall@2"] == pytest.approx(0.75)
    assert data["top1"] == pytest.approx(0.5)


def test_evaluate_rejects_malformed_json(tmp_path, capsys):
    results = tmp_path / "r.json"
    results.write_text('{"q1": ["a", "b"')
    truth = write_json(tmp_path / "gt.json", {"q1": ["a"]})
    assert cli.main(["evaluate", str(results), "--ground-truth", str(truth)]) == 2
    err = capsys.readouterr().err
    assert "r.json is not valid JSON" in err and "line 1" in err
    results.write_text('{"q1": "a.jpg"}')
    assert cli.main(["evaluate", str(results), "--ground-truth", str(truth)]) == 2
    assert "entry for 'q1' must be a list" in capsys.readouterr().err


def test_evaluate_rejects_queries_missing_from_ground_truth(tmp_path, capsys):
    results = write_json(tmp_path / "r.json", {"q1": ["a"], "extra.jpg": ["a"]})
    truth = write_json(tmp_path / "gt.json", {"q1": ["a"]})
    assert cli.main(["evaluate", str(results), "--ground-truth", str(truth)]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 queries in the results are not in the ground truth: extra.jpg" in err


def test_evaluate_needs_ground_truth(tmp_path, capsys):
    results = write_json(tmp_path / "r.json", {})
    with pytest.raises(SystemExit) as info:
        cli.main(["evaluate", str(results)])
    assert info.value.code == 2
    assert "--ground-truth" in capsys.readouterr().err


def test_evaluate_with_labels_from_folders(tmp_path, capsys):
    for rel in ["q/cat/1.jpg", "g/cat/a.jpg", "g/dog/b.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    results = write_json(tmp_path / "r.json", {"cat/1.jpg": ["dog/b.jpg", "cat/a.jpg"]})
    assert cli.main(["evaluate", str(results), "--labels-from-folders", str(tmp_path / "q"), str(tmp_path / "g"),
                     "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["map@10"] == pytest.approx(0.5) and data["top1"] == 0.0


# ---------------------------------------------------------------- usage errors, no services needed


def test_run_checks_inputs_before_starting_anything(tmp_path, capsys):
    assert cli.main(["run", "--gallery", str(tmp_path / "nope"), "--query", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "notes.txt").write_text("x")
    assert cli.main(["run", "--gallery", str(tmp_path / "g"), "--query", str(tmp_path / "g")]) == 2
    assert "no images under" in capsys.readouterr().err
    assert cli.main(["run", "--gallery", str(tmp_path), "--query", str(tmp_path), "--top-k", "0"]) == 2
    assert "--top-k must be between 1 and 1000" in capsys.readouterr().err


def test_unreachable_services_say_how_to_start_them(tmp_path, capsys):
    shutil.copy(demo.find_photos()[0], tmp_path / "a.png")
    assert cli.main(["index", str(tmp_path), "--embedder", "127.0.0.1:1", "--ranker", "127.0.0.1:2",
                     "--connect-timeout", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the ranker at 127.0.0.1:2" in err and "imagesearch serve" in err


# ---------------------------------------------------------------- HTML report


def test_html_report_holds_every_query_with_thumbnails(tmp_path):
    photos = demo.find_photos()[:4]
    (tmp_path / "g").mkdir()
    (tmp_path / "q" / "sub").mkdir(parents=True)
    for p in photos:
        shutil.copy(p, tmp_path / "g" / p.name)
    shutil.copy(photos[0], tmp_path / "q" / "sub" / "first.png")
    shutil.copy(photos[1], tmp_path / "q" / "second <b>.png")  # a name that needs escaping
    queries = [("sub/first.png", [Match(1, photos[0].name, 0.98), Match(2, photos[2].name, 0.4)]),
               ("second <b>.png", [Match(1, photos[3].name, 0.5), Match(2, "gone.jpg", 0.1)])]
    truth = {"sub/first.png": [photos[0].name], "second <b>.png": [photos[1].name]}
    ev = metrics.evaluate({q: [m.name for m in ms] for q, ms in queries}, truth, k=2)
    text = report.render("t", queries, query_root=tmp_path / "q", gallery_root=tmp_path / "g", ground_truth=truth,
                         evaluation=ev, failures={"broken.jpg": "INVALID_ARGUMENT: not an image"})
    parsed = parse_report(text)
    assert parsed.queries == ["sub/first.png", "second <b>.png"]
    # 2 query thumbnails + 3 gallery thumbnails; "gone.jpg" has no file -> a placeholder, not a crash
    assert len(parsed.images) == 5 and all(s.startswith("data:image/jpeg;base64,") for s in parsed.images)
    assert parsed.cells.count("cell rel") == 1 and parsed.cells.count("cell irr") == 3
    assert "broken.jpg" in text and "0.980" in text and "mAP@2" in text


# ---------------------------------------------------------------- end to end (real services)


@pytest.mark.slow
def test_run_end_to_end_through_real_services(tmp_path):
    gallery, query, truth = make_photo_set(tmp_path)
    gt = write_json(tmp_path / "gt.json", truth)
    out = tmp_path / "out" / "results.json"
    env = {**os.environ, "IMAGESEARCH_TORCH_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    env.pop("IMAGESEARCH_EMBEDDER", None)
    env.pop("IMAGESEARCH_RANKER", None)
    proc = subprocess.run(
        [sys.executable, "-m", "clients.cli", "run", "--gallery", str(gallery), "--query", str(query), "--out", str(out),
         "--ground-truth", str(gt), "--top-k", "3", "--no-progress", "--db", str(tmp_path / "g.db")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(truth)
    n_gallery = len([p for p in gallery.iterdir() if p.suffix == ".jpg"]) - 1  # minus broken.jpg
    assert all(len(v) == min(3, n_gallery) for v in results.values())
    assert "broken.jpg: INVALID_ARGUMENT" in proc.stderr  # reported, not a crash
    assert "1 files skipped (not images): README.txt" in proc.stderr
    assert "mAP@3" in proc.stdout
    ev = metrics.evaluate(results, truth, k=3)
    assert ev.top1 >= 0.8, proc.stdout  # altered copies of real photos: the original comes first
    parsed = parse_report((out.parent / "results.html").read_text())
    assert sorted(parsed.queries) == sorted(truth)
    # both services started, and were stopped cleanly (a bad exit code would be logged)
    assert "services ready" in proc.stderr
    assert "exited with code" not in proc.stderr and "killing it" not in proc.stderr


def _read_until(stream, marker: str, lines: list[str]) -> str:
    for line in stream:
        lines.append(line)
        if marker in line:
            return line
    raise AssertionError("serve ended before printing " + marker + ":\n" + "".join(lines))


@pytest.mark.slow
def test_serve_index_query_search_then_sigterm(tmp_path, capsys):
    gallery, query, truth = make_photo_set(tmp_path, n=4)
    env = {**os.environ, "IMAGESEARCH_TORCH_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    serve = subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "serve", "--db", str(tmp_path / "g.db"), "--embedder-port", "0",
         "--ranker-port", "0", "--embedder-replicas", "2", "--auth-token", "tok"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        _read_until(serve.stderr, "serving:", lines)
        export = _read_until(serve.stderr, "export ", lines)
        addresses = dict(part.split("=", 1) for part in export.split()[1:])
        embedder, ranker = addresses["IMAGESEARCH_EMBEDDER"], addresses["IMAGESEARCH_RANKER"]
        assert embedder.count(",") == 1  # two replicas, balanced round-robin by the client
        flags = ["--embedder", embedder, "--ranker", ranker, "--auth-token", "tok"]

        assert cli.main(["index", str(gallery), *flags, "--no-progress", "--chunk-size", "2"]) == 0
        first = capsys.readouterr().err
        n = len(list(gallery.glob("*.jpg"))) - 1
        assert f"indexed {n} of {n + 1} images" in first and f"({n} new, 0 replaced)" in first
        assert "broken.jpg: INVALID_ARGUMENT" in first and "run the same `imagesearch index` again" in first
        assert cli.main(["index", str(gallery), *flags, "--no-progress", "--strict"]) == 2  # broken.jpg
        again = capsys.readouterr().err  # re-running embeds nothing unchanged (broken.jpg fails again)
        assert "indexed 0 of" in again and f"{n} unchanged" in again

        out, page = tmp_path / "r.json", tmp_path / "r.html"
        gt = write_json(tmp_path / "gt.json", truth)
        assert cli.main(["query", str(query), *flags, "--out", str(out), "--html", str(page), "--gallery",
                         str(gallery), "--ground-truth", str(gt), "--top-k", "2", "--no-progress"]) == 0
        assert "top-1" in capsys.readouterr().err
        results = json.loads(out.read_text())
        assert sorted(results) == sorted(truth) and all(len(v) == 2 for v in results.values())
        assert sorted(parse_report(page.read_text()).queries) == sorted(truth)

        q = sorted(truth)[0]
        assert cli.main(["search", str(query / q), *flags, "--json", "--top-k", "3"]) == 0
        matches = json.loads(capsys.readouterr().out)
        assert [m["rank"] for m in matches] == [1, 2, 3] and matches[0]["name"] == truth[q][0]
        assert cli.main(["search", str(query / q), *flags, "--collection", "nope"]) == 2
        assert "index a gallery first" in capsys.readouterr().err
        assert cli.main(["search", str(query / q), "--embedder", embedder, "--ranker", ranker]) == 2
        assert "--auth-token" in capsys.readouterr().err
    finally:
        serve.terminate()  # SIGTERM: serve stops both services and exits 0
        _, rest = serve.communicate(timeout=60)
    assert serve.returncode == 0, "".join(lines) + rest
    assert "SIGTERM: stopping the services" in rest and rest.rstrip().endswith("stopped")
    capsys.readouterr()
    assert cli.main(["search", str(query / q), *flags, "--connect-timeout", "0.5"]) == 1  # both are gone
    assert "cannot reach the ranker" in capsys.readouterr().err
