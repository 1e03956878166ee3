"""bench.load at a small scale: an embedder and a ranker as real processes,
4 concurrent clients for a few seconds of mixed Embed and Search. No errors,
and every answer is checked here, independently of the bench's own checks:
each Embed vector against a single Embed call made here through the raw stub
(within 1e-5), each Search ranking against a numpy float64 reference computed
here from the vectors that were upserted."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from bench import load
from clients.types import Match
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc, ranker_pb2, ranker_pb2_grpc

TOL = 1e-5


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    with load.start_services(tmp_path_factory.mktemp("load"), torch_threads=1) as addresses:
        yield addresses


def reference(gallery_vectors: np.ndarray, names: list[str], query: np.ndarray, k: int):
    stored = gallery_vectors.astype(np.float64)
    stored = (stored / np.linalg.norm(stored, axis=1, keepdims=True)).astype(np.float32).astype(np.float64)
    q = query.astype(np.float64)
    scores = stored @ (q / np.linalg.norm(q))
    order = sorted(range(len(names)), key=lambda i: (-scores[i], names[i]))[:k]
    return [names[i] for i in order], [float(scores[i]) for i in order]


@pytest.mark.slow
def test_small_load_has_no_errors_and_every_answer_is_right(services):
    emb, rank = services
    workload = load.prepare(emb, rank, images=4, gallery=300, queries=12, top_k=7, seed=3)
    result = load.run_load(emb, rank, workload, clients=4, seconds=3, mix={"embed": 1, "search": 2}, seed=3,
                           keep_answers=True)

    assert result.errors == [] and result.wrong == [], (result.errors + result.wrong)[:3]
    embeds, searches = result.of("embed"), result.of("search")
    assert len(embeds) >= 4 and len(searches) >= 4, (len(embeds), len(searches))
    assert {c.kind for c in result.calls} == {"embed", "search"}

    with grpc.insecure_channel(emb) as e_channel, grpc.insecure_channel(rank) as r_channel:
        e_stub = embedder_pb2_grpc.EmbedderServiceStub(e_channel)
        singles = [np.asarray(e_stub.Embed(embedder_pb2.EmbedRequest(image=data), timeout=120).vector, np.float32)
                   for data in workload.images]
        r_stub = ranker_pb2_grpc.RankerServiceStub(r_channel)
        (stats,) = r_stub.GetStats(ranker_pb2.GetStatsRequest(collection=workload.collection), timeout=30).collections
    assert stats.count == len(workload.gallery_names) == 300
    # the photos differ, so matching "the right one" is a real check
    assert np.abs(singles[0] - singles[1]).max() > 0.01
    for call in embeds:
        assert call.answer.shape == (workload.dim,)
        assert np.abs(call.answer - singles[call.item]).max() <= TOL, call.item

    references = [reference(workload.gallery_vectors, workload.gallery_names, q, workload.top_k)
                  for q in workload.queries]
    for call in searches:
        names, scores = references[call.item]
        assert [n for n, _ in call.answer] == names, call.item
        assert np.allclose([s for _, s in call.answer], scores, rtol=0, atol=TOL)
    assert len({tuple(references[c.item][0]) for c in searches}) > 1  # not one answer for all

    rows = load.summarize(result)
    assert rows["embed"]["requests"] + rows["search"]["requests"] == rows["all"]["requests"] == len(result.calls)
    assert rows["all"]["errors"] == rows["all"]["wrong"] == 0
    assert 0 < rows["search"]["p50_ms"] <= rows["search"]["p99_ms"]


def test_the_bench_checks_flag_wrong_answers():
    """The bench's own checks would catch a wrong vector, fingerprint or ranking."""
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((50, 8)).astype(np.float32)
    names = [f"g{i:02d}" for i in range(50)]
    queries = rng.standard_normal((3, 8)).astype(np.float32)
    refs = [load.reference_ranking(load.stored_form(gallery), names, q, 5) for q in queries]
    image_vectors = load.stored_form(rng.standard_normal((2, 8)))
    w = load.Workload("c", "fp", 8, 5, [b"a", b"b"], image_vectors, names, gallery, queries,
                      [r[0] for r in refs], [r[1] for r in refs])
    right = [Match(i + 1, n, float(s)) for i, (n, s) in enumerate(zip(*refs[0]))]
    assert [m.name for m in right] == reference(gallery, names, queries[0], 5)[0]
    assert load.check_search(w, 0, right) == ""
    assert "differs from the reference" in load.check_search(w, 0, right[::-1])
    assert "differs from the reference" in load.check_search(w, 1, right)
    assert "scores differ" in load.check_search(w, 0, [Match(m.rank, m.name, m.score + 1e-3) for m in right])
    assert load.check_embed(w, 1, image_vectors[1].copy(), "fp") == ""
    assert "max abs difference" in load.check_embed(w, 1, image_vectors[1] + 2e-5, "fp")
    assert "max abs difference" in load.check_embed(w, 1, image_vectors[0], "fp")
    assert "fingerprint" in load.check_embed(w, 1, image_vectors[1], "other")


@pytest.mark.slow
def test_command_prints_the_table_and_writes_json(services, tmp_path, capsys):
    emb, rank = services
    out = tmp_path / "load.json"
    load.main(["--embedder", emb, "--ranker", rank, "--clients", "2", "--seconds", "1", "--gallery", "50",
               "--images", "2", "--queries", "4", "--mix", "embed=1,search=1", "--collection", "cmd", "--out",
               str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert set(data["rows"]) == {"embed", "search", "all"}
    assert data["rows"]["all"]["errors"] == 0 and data["rows"]["all"]["wrong"] == 0
    assert data["rows"]["all"]["requests"] > 0 and data["config"]["clients"] == 2
    assert "| Embed  |" in printed and "| Search |" in printed and "2 clients for 1 s" in printed


def test_mix_flag():
    assert load.parse_mix("embed=1,search=3") == {"embed": 1.0, "search": 3.0}
    assert load.parse_mix("search=1") == {"search": 1.0}
    for bad in ("", "embed", "upsert=1", "embed=x", "embed=0", "embed=-1,search=2"):
        with pytest.raises(Exception):
            load.parse_mix(bad)
