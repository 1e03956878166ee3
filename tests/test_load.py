"""`python -m bench.load` at a small scale, run as a command against an
embedder and a ranker started here: 4 concurrent clients for a few seconds of
mixed Embed and Search. No errors, and every answer the bench got is checked
here, independently of the bench's own checks: each Embed vector against a
single Embed call made here through the raw stub (within 1e-5), each Search
ranking against the float64 reference computed here from the vectors that
were upserted."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import numpy as np
import pytest

from testkit import ROOT, ServiceProcess, reference_ranking, sample_photos, unit32
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc, ranker_pb2, ranker_pb2_grpc

TOL = 1e-5


def bench_load(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.load", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    db = tmp_path_factory.mktemp("load") / "load.db"
    with ServiceProcess("embedder_service", "--device", "cpu") as emb, \
            ServiceProcess("ranker_service", "--db", str(db)) as rank:
        yield emb.address, rank.address


@pytest.mark.slow
def test_small_load_has_no_errors_and_every_answer_is_right(services, tmp_path):
    emb, rank = services
    out, answers = tmp_path / "load.json", tmp_path / "answers.npz"
    proc = bench_load("--embedder", emb, "--ranker", rank, "--clients", "4", "--seconds", "3", "--images", "4",
                      "--gallery", "300", "--queries", "12", "--top-k", "7", "--mix", "embed=1,search=2",
                      "--seed", "3", "--out", str(out), "--answers", str(answers))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    data = json.loads(out.read_text())
    rows = data["rows"]
    assert rows["all"]["errors"] == rows["all"]["wrong"] == 0, data["error_examples"] + data["wrong_examples"]
    assert rows["embed"]["requests"] + rows["search"]["requests"] == rows["all"]["requests"]
    assert 0 < rows["search"]["p50_ms"] <= rows["search"]["p99_ms"]
    assert "| Embed  |" in proc.stdout and "| Search |" in proc.stdout and "4 clients for 3 s" in proc.stdout

    a = np.load(answers)
    assert len(a["embed_items"]) == rows["embed"]["requests"] >= 4
    assert len(a["search_items"]) == rows["search"]["requests"] >= 4

    photos = sample_photos(4)  # the bench's photos: the same function, the same arguments
    with grpc.insecure_channel(emb) as e_channel, grpc.insecure_channel(rank) as r_channel:
        e_stub = embedder_pb2_grpc.EmbedderServiceStub(e_channel)
        singles = [np.asarray(e_stub.Embed(embedder_pb2.EmbedRequest(image=data), timeout=120).vector, np.float32)
                   for data in photos]
        r_stub = ranker_pb2_grpc.RankerServiceStub(r_channel)
        (stats,) = r_stub.GetStats(ranker_pb2.GetStatsRequest(collection=str(a["collection"])),
                                   timeout=30).collections
    assert stats.count == len(a["gallery_names"]) == 300
    assert np.abs(singles[0] - singles[1]).max() > 0.01  # the photos differ: matching the right one is a check
    for item, vector in zip(a["embed_items"], a["embed_vectors"]):
        assert np.abs(vector - singles[item]).max() <= TOL, item

    names = [str(n) for n in a["gallery_names"]]
    references = [reference_ranking(unit32(a["gallery_vectors"]), names, q, int(a["top_k"])) for q in a["queries"]]
    for item, got_names, got_scores in zip(a["search_items"], a["search_names"], a["search_scores"]):
        want_names, want_scores = references[item]
        assert [str(n) for n in got_names] == want_names, item
        assert np.allclose(got_scores, want_scores, rtol=0, atol=TOL)
    assert len({tuple(references[i][0]) for i in a["search_items"]}) > 1  # not one answer for all


@pytest.mark.parametrize("mix", ["upsert=1", "embed=-1,search=2"])
def test_a_bad_mix_is_refused_before_anything_starts(mix):
    proc = bench_load("--mix", mix, timeout=60)
    assert proc.returncode == 2 and "--mix" in proc.stderr, proc.stderr
