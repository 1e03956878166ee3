"""`imagesearch index` as an incremental, resumable job, over a real
embedder and a real ranker process: new, changed, renamed, touched and
deleted files each handled (and nothing else embedded), attributes from
folders and --attributes, filtered and thresholded queries, dedupe, and a
run killed half way resumed with no duplicates and no acknowledged file
embedded again."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clients import cli
from clients.ranker import RankerClient
from testkit import ROOT, ServiceProcess, sample_photos

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    db = tmp_path_factory.mktemp("ranker") / "g.db"
    with ServiceProcess("embedder_service", "--backbone", "efficientnet_lite0") as embedder, \
            ServiceProcess("ranker_service", "--db", str(db)) as ranker:
        yield embedder, ranker


@pytest.fixture(scope="module")
def photos():
    return sample_photos(70, max_side=160)


def flags(services, collection):
    embedder, ranker = services
    return ["--embedder", embedder.address, "--ranker", ranker.address, "--collection", collection, "--no-progress"]


def items(services, collection, **kw):
    with RankerClient(services[1].address) as rank:
        return {i.name: i for i in rank.list_items(collection, **kw)}


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_new_changed_renamed_touched_and_deleted_files_each_handled(services, photos, tmp_path, capsys):
    g = tmp_path / "gallery"
    for i in range(4):
        write(g / "shirts" / f"{i}.jpg", photos[i])
        write(g / "shoes" / f"{i}.jpg", photos[10 + i])
    f = flags(services, "inc")
    assert cli.main(["index", str(g), *f, "--attributes-from-folders", "--attributes", "shop=north"]) == 0
    out = capsys.readouterr().err
    assert "indexed 8 of 8 images" in out and "(8 new, 0 replaced)" in out and "8 files hashed" in out
    first = items(services, "inc", with_vectors=True)
    assert sorted(first) == sorted(p.relative_to(g).as_posix() for p in g.rglob("*.jpg"))
    a = first["shoes/2.jpg"].attributes
    assert a["class"] == "shoes" and a["shop"] == "north" and a["size"] == str((g / "shoes/2.jpg").stat().st_size)
    assert a["sha256"] == hashlib.sha256((g / "shoes/2.jpg").read_bytes()).hexdigest()
    assert a["mtime"] == str((g / "shoes/2.jpg").stat().st_mtime_ns)

    # An unchanged gallery: nothing embedded, nothing hashed, nothing written.
    assert cli.main(["index", str(g), *f, "--attributes-from-folders", "--attributes", "shop=north"]) == 0
    out = capsys.readouterr().err
    assert "indexed 0 of 8 images" in out and "8 unchanged, 0 renamed, 0 with new attributes" in out
    assert "0 files hashed" in out
    assert {n: i.updated_at for n, i in items(services, "inc").items()} == {n: i.updated_at for n, i in first.items()}

    write(g / "shirts/0.jpg", photos[20])                               # changed content
    (g / "shoes/1.jpg").rename(g / "shoes/1-renamed.jpg")               # renamed
    (g / "shirts/2.jpg").unlink()                                       # deleted
    write(g / "hats/new.jpg", photos[21])                               # new
    st = (g / "shirts/3.jpg").stat()                                    # touched: same bytes, new mtime
    os.utime(g / "shirts/3.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert cli.main(["index", str(g), *f, "--attributes-from-folders", "--attributes", "shop=north", "--sync"]) == 0
    out = capsys.readouterr().err
    assert "indexed 2 of 8 images" in out and "(1 new, 1 replaced)" in out, out
    assert "4 unchanged, 1 renamed, 1 with new attributes" in out and "1 items whose files are gone were deleted" in out
    after = items(services, "inc", with_vectors=True)
    assert sorted(after) == sorted(p.relative_to(g).as_posix() for p in g.rglob("*.jpg"))
    # The rename kept the stored vector; the touched file kept its vector with a new mtime.
    np.testing.assert_array_equal(after["shoes/1-renamed.jpg"].vector, first["shoes/1.jpg"].vector)
    assert after["shoes/1-renamed.jpg"].attributes["sha256"] == first["shoes/1.jpg"].attributes["sha256"]
    np.testing.assert_array_equal(after["shirts/3.jpg"].vector, first["shirts/3.jpg"].vector)
    assert after["shirts/3.jpg"].attributes["mtime"] == str(st.st_mtime_ns + 5_000_000_000)
    assert not np.array_equal(after["shirts/0.jpg"].vector, first["shirts/0.jpg"].vector)
    assert after["hats/new.jpg"].attributes["class"] == "hats"
    for name in ("shirts/1.jpg", "shoes/0.jpg", "shoes/2.jpg", "shoes/3.jpg"):
        assert after[name].updated_at == first[name].updated_at  # not written again

    # Without --sync a gone file's item stays, and is said so; --full embeds everything again.
    (g / "hats/new.jpg").unlink()
    assert cli.main(["index", str(g), *f, "--attributes-from-folders", "--attributes", "shop=north"]) == 0
    assert "1 items whose files are gone are still in the collection" in capsys.readouterr().err
    assert "hats/new.jpg" in items(services, "inc")
    assert cli.main(["index", str(g), *f, "--attributes-from-folders", "--attributes", "shop=north", "--full"]) == 0
    assert "indexed 7 of 7 images" in capsys.readouterr().err
    assert cli.main(["index", str(g), *f, "--attributes", "size=1"]) == 2
    assert "--attributes cannot set size" in capsys.readouterr().err


def test_filtered_query_search_min_score_and_dedupe(services, photos, tmp_path, capsys):
    g = tmp_path / "gallery"
    for i in range(6):
        write(g / "red" / f"{i}.jpg", photos[30 + i])
        write(g / "blue" / f"{i}.jpg", photos[40 + i])
    shutil.copy(g / "red/0.jpg", g / "blue/copy-of-red-0.jpg")  # an exact duplicate in the other class
    f = flags(services, "colours")
    assert cli.main(["index", str(g), *f, "--attributes-from-folders"]) == 0
    capsys.readouterr()

    q = tmp_path / "queries"
    write(q / "r0.jpg", (g / "red/0.jpg").read_bytes())
    write(q / "b1.jpg", (g / "blue/1.jpg").read_bytes())
    out = tmp_path / "res.json"
    assert cli.main(["query", str(q), *f, "--filter", "class=red", "--top-k", "5", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert all(len(v) == 5 and all(n.startswith("red/") for n in v) for v in results.values())
    assert results["r0.jpg"][0] == "red/0.jpg"
    assert cli.main(["query", str(q), *f, "--filter", "class=red", "--filter", "class=blue", "--top-k", "13",
                     "--out", str(out), "--min-score", "0.999"]) == 0
    results = json.loads(out.read_text())
    assert sorted(results["r0.jpg"]) == ["blue/copy-of-red-0.jpg", "red/0.jpg"] and results["b1.jpg"] == ["blue/1.jpg"]
    capsys.readouterr()

    s = f[:-1]  # search and dedupe show no progress bar
    assert cli.main(["search", str(q / "b1.jpg"), *s, "--filter", "class=blue", "--top-k", "3", "--json"]) == 0
    matches = json.loads(capsys.readouterr().out)
    assert len(matches) == 3 and matches[0]["name"] == "blue/1.jpg"
    assert all(m["attributes"]["class"] == "blue" for m in matches)
    assert cli.main(["search", str(q / "b1.jpg"), *s, "--min-score", "0.999", "--json"]) == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["blue/1.jpg"]

    groups_path, page = tmp_path / "dupes.json", tmp_path / "dupes.html"
    assert cli.main(["dedupe", *s, "--threshold", "0.97", "--out", str(groups_path), "--html", str(page),
                     "--gallery", str(g)]) == 0
    groups = json.loads(groups_path.read_text())
    assert groups["items"] == 13 and groups["threshold"] == 0.97
    assert {"names": ["blue/copy-of-red-0.jpg", "red/0.jpg"]}.items() <= groups["groups"][0].items()
    assert all(s >= 0.97 for grp in groups["groups"] for _, _, s in grp["pairs"])
    text = page.read_text()
    assert "copy-of-red-0.jpg" in text and "data:image/jpeg;base64," in text


def test_dedupe_groups_are_connected_components():
    from clients.cli.dedupe import near_duplicate_groups

    def at(degrees):  # unit vectors in one plane: cos(6 deg) = 0.9945, cos(12 deg) = 0.978
        r = np.radians(degrees)
        return [np.cos(r), np.sin(r), 0.0]

    vectors = np.array([at(0), at(6), at(12), [0.0, 0.0, 1.0]], dtype=np.float32)
    groups = near_duplicate_groups(["a", "b", "c", "d"], vectors, 0.99)
    assert [g.names for g in groups] == [["a", "b", "c"]]  # a~b and b~c join a and c (0.978); d is in no group
    assert [(x, y) for x, y, _ in groups[0].pairs] == [("a", "b"), ("b", "c")]
    assert near_duplicate_groups(["a", "b", "c", "d"], vectors, 0.999) == []


def test_a_killed_run_resumes_without_duplicates_or_embedding_acknowledged_files(services, photos, tmp_path,
                                                                                 capsys):
    g = tmp_path / "gallery"
    n = 60
    for i in range(n):
        write(g / f"{i:03d}.jpg", photos[i])
    _, ranker = services
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "clients.cli", "index", str(g), *flags(services, "killed"), "--chunk-size", "2",
           "--concurrency", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with RankerClient(ranker.address) as rank:
        deadline = time.monotonic() + 120
        count = 0
        while time.monotonic() < deadline and proc.poll() is None:
            stats = rank.stats().collection("killed")
            count = stats.count if stats else 0
            if count >= 6:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert 6 <= count < n, f"the run was not caught half way ({count} of {n} stored)"
    time.sleep(0.5)  # whatever the ranker was committing when the client died
    before = {name: i.updated_at for name, i in items(services, "killed").items()}
    assert 6 <= len(before) < n

    assert cli.main(["index", str(g), *flags(services, "killed")]) == 0
    out = capsys.readouterr().err
    assert f"indexed {n - len(before)} of {n} images" in out and f"({n - len(before)} new, 0 replaced)" in out, out
    assert f"{len(before)} unchanged" in out
    after = items(services, "killed")
    assert sorted(after) == [f"{i:03d}.jpg" for i in range(n)]  # every file once
    assert all(after[name].updated_at == t for name, t in before.items())  # acknowledged ones not written again


def test_the_planner_takes_a_file_that_vanished_or_cannot_be_read_as_an_event(tmp_path):
    from clients.cli.incremental import make_plan
    from clients.files import list_images
    from clients.types import StoredItem

    for name in ("a.jpg", "b.jpg", "c.jpg"):
        write(tmp_path / name, name.encode())
    listing = list_images(tmp_path)
    (tmp_path / "b.jpg").unlink()                  # removed after the listing
    (tmp_path / "c.jpg").unlink()
    (tmp_path / "c.jpg").mkdir()                   # stat works, reading fails
    stored = {"b.jpg": StoredItem("b.jpg", {"sha256": "x", "size": "5", "mtime": "1"}, 0.0, 0.0, "")}
    plan = make_plan(listing.images, stored, lambda name: {})
    assert plan.vanished == ["b.jpg"] and plan.gone == ["b.jpg"]
    assert list(plan.unreadable) == ["c.jpg"] and "cannot read c.jpg" in plan.unreadable["c.jpg"]
    assert plan.embed == [("a.jpg", tmp_path / "a.jpg")] and plan.hashed == 1


def test_index_sync_while_files_are_deleted_and_renamed_converges(services, photos, tmp_path, capsys):
    """A seeded writer deletes and renames gallery files while `index --sync`
    reads the folder: each run ends with an exit code, never a traceback; a
    run over the quiet folder then makes the collection equal the folder, and
    one more changes nothing."""
    import random
    import threading

    g = tmp_path / "gallery"
    for i in range(48):
        write(g / f"{i:02d}.jpg", photos[i])
    f = flags(services, "racing")
    rng = random.Random(7)
    for attempt in range(3):
        stop = threading.Event()

        def churn():
            while not stop.is_set():
                files = sorted(g.glob("*.jpg"))
                if len(files) < 8:
                    return
                victim = rng.choice(files)
                with __import__("contextlib").suppress(OSError):
                    if rng.random() < 0.5:
                        victim.unlink()
                    else:
                        victim.rename(victim.with_name(f"r{rng.randrange(10**6)}.jpg"))
                time.sleep(0.002)

        writer = threading.Thread(target=churn)
        writer.start()
        try:
            rc = cli.main(["index", str(g), *f, "--sync"])
        finally:
            stop.set()
            writer.join()
        err = capsys.readouterr().err
        assert rc == 0, err
        assert "Traceback" not in err
    assert cli.main(["index", str(g), *f, "--sync"]) == 0
    capsys.readouterr()
    assert sorted(items(services, "racing")) == sorted(p.name for p in g.glob("*.jpg"))
    assert cli.main(["index", str(g), *f, "--sync"]) == 0
    out = capsys.readouterr().err
    n = len(list(g.glob("*.jpg")))
    assert f"indexed 0 of {n} images" in out and f"{n} unchanged, 0 renamed, 0 with new attributes" in out, out
    assert "deleted" not in out


def test_a_name_the_ranker_refuses_fails_that_file_alone(services, photos, tmp_path, capsys):
    """Names with a newline or ESC are legal on Linux and refused by the ranker:
    each is reported with the ranker's reason, every other file of its chunk is
    indexed, the exit code follows the rule for bad inputs, and a rerun stays
    the same."""
    g = tmp_path / "gallery"
    for i in range(40):
        write(g / f"{i:02d}.jpg", photos[i])
    write(g / "bad\nname.jpg", photos[50])
    write(g / "esc\x1b[31m.jpg", photos[51])
    f = flags(services, "oddnames")
    for rerun in (False, True):
        rc = cli.main(["index", str(g), *f, "--chunk-size", "32"])
        err = capsys.readouterr().err
        assert rc == 0, err
        assert "indexed 40 of 42 images" in err if not rerun else "indexed 0 of 42 images" in err, err
        assert "control characters" in err and "Traceback" not in err
        assert sorted(items(services, "oddnames")) == [f"{i:02d}.jpg" for i in range(40)]
    assert cli.main(["index", str(g), *f, "--strict"]) == 2
    capsys.readouterr()
    out = tmp_path / "r.json"
    assert cli.main(["query", str(g), *f, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert len(results) == 42 and results["07.jpg"][0] == "07.jpg"   # a query's name is only a label
