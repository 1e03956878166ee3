"""`imagesearch reindex` and `imagesearch alias` over a real embedder serving
two models and a real ranker: clients searching through the alias see no
failed call and answers of one model at a time through a whole reindex,
switch and rollback; a reindex killed with SIGKILL resumes without embedding
again what it stored; a new model that scores lower is not switched to
unless --force; the alias commands' exit codes; `index --alias` on a new
gallery; the fingerprint mismatch message names reindex.

The embedder serves `small` (its default: ImageNet Lite0 at 32 x 32 pixels,
a checkpoint made here, cheap to embed) and `base` (ImageNet Lite0 at its
224 pixels): two fingerprints, the same dimension, and on the demo photos
`base` scores the higher mAP@10."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clients import cli
from clients.cli import demo
from clients.embedder import EmbedderClient
from clients.ranker import RankerClient
from testkit import ROOT, ServiceProcess, reference_ranking, sample_photos

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    import torch

    from imagesearch.model.backbones import build_model
    from imagesearch.model.checkpoint import load_model, save_checkpoint
    from imagesearch.model.preprocessing import PreprocessSpec

    torch.set_num_threads(1)
    spec = load_model().spec
    model = build_model("efficientnet_lite0", "imagenet")
    meta = {"backbone": "efficientnet_lite0", "class_names": [], "embedding_dim": 1280, "epoch": 0, "metrics": {},
            "preprocess": PreprocessSpec(32, spec.mean, spec.std, spec.interpolation).to_dict(),
            "model": model.options()}
    return save_checkpoint(tmp_path_factory.mktemp("model") / "small.pt", model, meta)


@pytest.fixture(scope="module")
def services(tmp_path_factory, small_checkpoint):
    db = tmp_path_factory.mktemp("ranker") / "g.db"
    with ServiceProcess("embedder_service", "--model", f"small={small_checkpoint}",
                        "--model", "base=efficientnet_lite0") as embedder, \
            ServiceProcess("ranker_service", "--db", str(db)) as ranker:
        yield embedder, ranker


@pytest.fixture(scope="module")
def fingerprints(services):
    with EmbedderClient(services[0].address) as emb:
        return {m.model: m.fingerprint for m in emb.models()}


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory):
    """The demo's 22 photos as a gallery, altered copies as queries, and the ground truth."""
    gallery, query, gt_path, _ = demo.build(tmp_path_factory.mktemp("demo"), seed=1)
    return gallery, query, gt_path


def flags(services) -> list[str]:
    embedder, ranker = services
    return ["--embedder", embedder.address, "--ranker", ranker.address, "--no-progress"]


def copy_gallery(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def aliases(services) -> dict:
    with RankerClient(services[1].address) as rank:
        return {a.name: a for a in rank.list_aliases()}


def test_alias_commands_index_alias_and_the_mismatch_message(services, fingerprints, photo_set, tmp_path, capsys):
    f = flags(services)
    g = copy_gallery(photo_set[0], tmp_path / "gallery")
    assert cli.main(["alias", "rollback", "shop", *f[:4]]) == 2
    assert "no alias 'shop'" in capsys.readouterr().err

    # index --alias on a new gallery: the collection (named from the model's fingerprint) and the alias.
    assert cli.main(["index", str(g), "--alias", "shop", *f]) == 0
    err = capsys.readouterr().err
    shop = f"shop-{fingerprints['small'][:12]}"
    assert f"created alias 'shop' -> collection {shop!r}" in err and "indexed 22 of 22 images" in err, err
    assert aliases(services)["shop"].collection == shop
    # Again: the alias exists, the run is incremental through it.
    assert cli.main(["index", str(g), "--alias", "shop", *f]) == 0
    assert "indexed 0 of 22 images" in capsys.readouterr().err
    out = tmp_path / "r.json"
    assert cli.main(["query", str(photo_set[1]), "--collection", "shop", "--out", str(out), *f]) == 0
    assert len(json.loads(out.read_text())) == 22
    capsys.readouterr()

    r = f[:4]
    with RankerClient(services[1].address) as rank:
        rank.create_collection("other", 1280, fingerprints["base"])
    assert cli.main(["alias", "create", "mirror", shop, *r]) == 0
    assert cli.main(["alias", "create", "mirror", shop, *r]) == 0          # the same again: no error
    assert cli.main(["alias", "create", "mirror", "other", *r]) == 2       # another target: exists
    assert "ALREADY_EXISTS" in capsys.readouterr().err
    assert cli.main(["alias", "create", shop, "shop", *r]) == 2             # a collection's name
    assert cli.main(["alias", "switch", "mirror", "no-such-collection", *r]) == 2
    assert cli.main(["alias", "rollback", "mirror", *r]) == 2               # no previous collection
    err = capsys.readouterr().err
    assert "no previous collection" in err
    assert cli.main(["alias", "list", *r]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split() == ["ALIAS", "COLLECTION", "PREVIOUS"]
    assert sorted(line.split() for line in listed[1:]) == [["mirror", shop, "-"], ["shop", shop, "-"]]

    assert cli.main(["alias", "switch", "mirror", "other", *r]) == 0
    assert aliases(services)["mirror"].collection == "other"
    assert cli.main(["alias", "rollback", "mirror", *r]) == 0
    assert "rolled back alias 'mirror'" in capsys.readouterr().err
    assert (aliases(services)["mirror"].collection, aliases(services)["mirror"].previous) == (shop, "other")
    assert cli.main(["alias", "drop", "mirror", *r]) == 0
    assert cli.main(["alias", "drop", "mirror", *r]) == 2
    assert "mirror" not in aliases(services)
    capsys.readouterr()

    # A collection of a model no embedder serves: the message names the way forward.
    with RankerClient(services[1].address) as rank:
        rank.create_collection("foreign", 1280, "f" * 64)
    assert cli.main(["index", str(g), "--collection", "foreign", *f]) == 2
    err = capsys.readouterr().err
    assert "indexed with another model" in err and "imagesearch reindex GALLERY_DIR --alias" in err, err
    assert cli.main(["reindex", str(g), "--alias", "nobody", *f]) == 2
    assert "imagesearch index GALLERY_DIR --alias nobody" in capsys.readouterr().err


def test_clients_searching_the_alias_see_one_model_per_answer_through_reindex_switch_and_rollback(
        services, fingerprints, photo_set, tmp_path, capsys):
    f = flags(services)
    g = copy_gallery(photo_set[0], tmp_path / "gallery")
    assert cli.main(["index", str(g), "--alias", "live", *f]) == 0
    capsys.readouterr()
    old, new = f"live-{fingerprints['small'][:12]}", f"live-{fingerprints['base'][:12]}"
    with RankerClient(services[1].address) as rank:
        queries = [(i.name, i.vector) for i in rank.list_items(old, with_vectors=True)][:6]

    stop = threading.Event()
    answers: list[tuple[str, str, str, list]] = []        # (call, fingerprint, query, matches)
    streams: list[set[str]] = []                          # the fingerprints of each stream's answers
    failures: list[str] = []

    def search_loop():
        with RankerClient(services[1].address) as rank:
            while not stop.is_set():
                try:
                    for name, vector in queries:
                        result = rank.search("live", vector, top_k=5)
                        answers.append(("search", result.fingerprint, name, list(result)))
                    seen = set()
                    for result in rank.search_stream("live", queries, top_k=5):
                        assert result.ok, result
                        seen.add(result.fingerprint)
                        answers.append(("stream", result.fingerprint, result.name, result.matches))
                    streams.append(seen)
                except Exception as exc:  # noqa: BLE001 - every failure is counted, none may happen
                    failures.append(repr(exc))

    added = {}
    first = min(g.iterdir())

    def change_the_folder_during_the_first_pass():
        with RankerClient(services[1].address) as rank:
            while not stop.is_set():
                stats = rank.stats().collection(new)
                if stats is not None and stats.count >= 4:
                    added["count"] = stats.count
                    shutil.copy(g / "coffee.jpg", g / "coffee-copy.jpg")
                    first.unlink()  # stored by the first pass's first chunk
                    return
                time.sleep(0.01)

    threads = [threading.Thread(target=search_loop), threading.Thread(target=change_the_folder_during_the_first_pass)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        started_at = len(answers)
        rc = cli.main(["reindex", str(g), "--alias", "live", "--model", "base", "--chunk-size", "2",
                       "--concurrency", "1", *f])
        err = capsys.readouterr().err
        switched_at = len(answers)
        time.sleep(0.5)
        assert cli.main(["alias", "rollback", "live", *f[:4]]) == 0
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert rc == 0, err
    assert not failures, failures[:3]
    # The folder changed while the first pass ran: the final pass took it in, the count check passed.
    assert added["count"] < 22, "the folder changed after the first pass: the test proves nothing"
    assert "final pass" in err and "(1 new, 0 replaced)" in err and "1 items whose files are gone were deleted" in err
    assert "check: 22 items in" in err and "for 22 indexable files: ok" in err
    assert "20 of 20 sampled images (seed 0) find themselves at rank 1" in err
    assert "top-10 overlap of old and new on the sample" in err and "alias rollback live" in err, err

    # Every answer is entirely one collection's: its fingerprint names it, its ranking is that collection's.
    with RankerClient(services[1].address) as rank:
        stored = {c: {i.name: i.vector for i in rank.list_items(c, with_vectors=True)} for c in (old, new)}
    by_fingerprint = {fingerprints["small"]: old, fingerprints["base"]: new}
    vectors = dict(queries)
    for call, fingerprint, query, matches in answers:
        collection = stored[by_fingerprint[fingerprint]]
        _, scores = reference_ranking(list(collection.values()), list(collection), vectors[query], 5)
        assert [m.score for m in matches] == pytest.approx(scores, abs=1e-5), (call, fingerprint, query)
        assert {m.name for m in matches} <= set(collection)
    assert all(len(s) == 1 for s in streams)
    # One thread's answers in order: the old model's, the new one's from the switch, the old one's from the rollback.
    seen = [fp for _, fp, _, _ in answers]
    changes = [i for i in range(1, len(seen)) if seen[i] != seen[i - 1]]
    assert seen[0] == fingerprints["small"] and len(changes) == 2, changes
    assert started_at <= changes[0] and switched_at <= changes[1]  # switched by reindex, back by the rollback
    assert aliases(services)["live"].collection == old and aliases(services)["live"].previous == new


def test_a_reindex_killed_with_sigkill_resumes_and_embeds_only_the_rest(services, fingerprints, tmp_path, capsys):
    g = tmp_path / "gallery"
    g.mkdir()
    n = 40
    for i, data in enumerate(sample_photos(n, max_side=160)):
        (g / f"{i:03d}.jpg").write_bytes(data)
    f = flags(services)
    assert cli.main(["index", str(g), "--alias", "kill", *f]) == 0
    capsys.readouterr()
    shadow = f"kill-{fingerprints['base'][:12]}"
    cmd = [sys.executable, "-m", "clients.cli", "reindex", str(g), "--alias", "kill", "--model", "base",
           "--chunk-size", "2", "--concurrency", "1", *f]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    with RankerClient(services[1].address) as rank:
        deadline, count = time.monotonic() + 120, 0
        while time.monotonic() < deadline and proc.poll() is None:
            stats = rank.stats().collection(shadow)
            count = stats.count if stats else 0
            if count >= 6:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert 6 <= count < n, f"the run was not caught half way ({count} of {n} stored)"
        time.sleep(0.5)  # whatever the ranker was committing when the client died
        before = rank.stats().collection(shadow).count
    assert aliases(services)["kill"].collection == f"kill-{fingerprints['small'][:12]}"  # not switched

    assert cli.main(["reindex", str(g), "--alias", "kill", "--model", "base", *f]) == 0
    err = capsys.readouterr().err
    assert f"resuming in collection {shadow!r}" in err
    assert f"indexed {n - before} of {n} images" in err and f"{before} unchanged" in err, err
    assert "indexed 0 of 40 images" in err  # the final pass: nothing left
    assert aliases(services)["kill"].collection == shadow
    # Once switched, the same command has nothing to do.
    assert cli.main(["reindex", str(g), "--alias", "kill", "--model", "base", *f]) == 0
    assert "nothing to switch" in capsys.readouterr().err


def test_a_new_model_that_scores_lower_is_switched_to_only_with_force(services, fingerprints, photo_set, tmp_path,
                                                                     capsys):
    f = flags(services)
    g = copy_gallery(photo_set[0], tmp_path / "gallery")
    quality = ["--queries", str(photo_set[1]), "--ground-truth", str(photo_set[2])]
    small, base = f"q-{fingerprints['small'][:12]}", f"q-{fingerprints['base'][:12]}"
    assert cli.main(["index", str(g), "--alias", "q", *f]) == 0
    capsys.readouterr()
    # small -> base scores higher: switched.
    assert cli.main(["reindex", str(g), "--alias", "q", "--model", "base", *quality, *f]) == 0
    err = capsys.readouterr().err
    assert "check: mAP@10" in err and f"switched alias 'q': {small!r} -> {base!r}" in err, err
    # query follows the alias to the model of its new target (the embedder's default is still `small`).
    out = tmp_path / "r.json"
    assert cli.main(["query", str(photo_set[1]), "--collection", "q", "--out", str(out), *f]) == 0
    truth = json.loads(photo_set[2].read_text())
    assert sum(json.loads(out.read_text())[k][0] in v for k, v in truth.items()) == len(truth)  # base: all top-1
    web_search_follows_the_alias(services, photo_set[1], collection="q", target=base, fingerprint=fingerprints["base"])
    # base -> small scores lower: refused, exit 2, nothing switched; the previous collection is reused.
    assert cli.main(["reindex", str(g), "--alias", "q", "--model", "small", *quality, *f]) == 2
    err = capsys.readouterr().err
    assert f"resuming in collection {small!r}" in err and "indexed 0 of 22 images" in err
    assert "not switched: the new model scores lower" in err and "--force switches anyway" in err, err
    assert aliases(services)["q"].collection == base
    # --force switches; --drop-old drops the old collection.
    assert cli.main(["reindex", str(g), "--alias", "q", "--model", "small", *quality, "--force", "--drop-old",
                     *f]) == 0
    err = capsys.readouterr().err
    assert f"switched alias 'q': {base!r} -> {small!r}" in err and f"dropped the old collection {base!r}" in err
    with RankerClient(services[1].address) as rank:
        assert rank.stats().collection(base) is None
    assert cli.main(["alias", "rollback", "q", *f[:4]]) == 2  # its previous collection is gone


def test_an_alias_moved_during_the_reindex_is_not_switched(services, fingerprints, photo_set, tmp_path, capsys):
    f = flags(services)
    g = copy_gallery(photo_set[0], tmp_path / "gallery")
    assert cli.main(["index", str(g), "--alias", "cas", *f]) == 0
    capsys.readouterr()
    shadow = f"cas-{fingerprints['base'][:12]}"
    with RankerClient(services[1].address) as rank:
        rank.create_collection("cas-elsewhere", 1280, fingerprints["small"])

        def move_it():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                stats = rank.stats().collection(shadow)
                if stats is not None and stats.count >= 2:
                    rank.switch_alias("cas", "cas-elsewhere")
                    return
                time.sleep(0.01)

        mover = threading.Thread(target=move_it)
        mover.start()
        rc = cli.main(["reindex", str(g), "--alias", "cas", "--model", "base", "--chunk-size", "2",
                       "--concurrency", "1", *f])
        mover.join()
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "not switched: alias 'cas' was moved off" in err and "cas-elsewhere" in err, err
    assert aliases(services)["cas"].collection == "cas-elsewhere"


def web_search_follows_the_alias(services, queries: Path, *, collection: str, target: str, fingerprint: str) -> None:
    """The web page lists the alias, and a search through it embeds with the
    model of its target (not the embedder's default) and answers from it."""
    pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx (dev extra)")
    from starlette.testclient import TestClient

    from clients.web.app import WebConfig, create_app

    with TestClient(create_app(WebConfig(services[0].address, services[1].address))) as c:
        listed = c.get("/api/collections").json()["collections"]
        assert {"name": collection, "alias_of": target} in [{k: x[k] for k in ("name", "alias_of")} for x in listed]
        photo = next(queries.iterdir())
        answer = c.post("/api/search", data={"collection": collection},
                        files={"image": (photo.name, photo.read_bytes(), "image/jpeg")})
        assert answer.status_code == 200, answer.text
        assert (answer.json()["collection"], answer.json()["fingerprint"]) == (target, fingerprint)


def test_a_query_run_that_spans_a_switch_is_answered_by_one_collection(services, fingerprints, photo_set, tmp_path,
                                                                       capsys):
    """`query` resolves the alias once: a switch after its first chunk leaves the
    rest of the run on the collection it started with (no chunk fails on the
    fingerprint check of the other model's collection)."""
    from clients.cli.jobs import query_folder

    f = flags(services)
    g = copy_gallery(photo_set[0], tmp_path / "gallery")
    assert cli.main(["index", str(g), "--alias", "span", *f]) == 0
    with RankerClient(services[1].address) as rank:  # the other model's collection, ready to switch to
        rank.create_collection("span-base", 1280, fingerprints["base"])
    assert cli.main(["index", str(g), "--collection", "span-base", *f]) == 0
    capsys.readouterr()
    old = aliases(services)["span"].collection
    with EmbedderClient(services[0].address) as emb, \
            RankerClient(services[1].address) as rank, RankerClient(services[1].address) as other:
        searched = []

        def switching(collection, *args, **kwargs):
            searched.append(collection)
            if len(searched) == 1:
                other.switch_alias("span", "span-base")
            return search_stream(collection, *args, **kwargs)

        search_stream, rank.search_stream = rank.search_stream, switching
        report = query_folder(emb, rank, photo_set[1], collection="span", chunk_size=2,
                              concurrency=1, progress=False)
    assert aliases(services)["span"].collection == "span-base"
    assert not report.failed and len(report.results) == 22, report.failed
    assert len(searched) == 11 and set(searched) == {old}, searched
