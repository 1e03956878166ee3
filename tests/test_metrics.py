"""Retrieval metrics against hand-computed cases, and the files they read."""

from __future__ import annotations

import json

import pytest

from clients import metrics
from clients.errors import UsageError


def test_average_precision_hand_computed():
    # hits at ranks 1, 3, 5: (1/1 + 2/3 + 3/5) / min(4 relevant, k=5)
    ap = metrics.average_precision(["a", "x", "b", "y", "c"], {"a", "b", "c", "d"}, k=5)
    assert ap == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)


def test_ap_normalised_by_k_when_more_are_relevant():
    # 3 relevant, k=2, both places hit: a perfect top-2 scores 1, not 2/3.
    assert metrics.average_precision(["a", "b", "z"], {"a", "b", "c"}, k=2) == pytest.approx(1.0)
    # only one of 3 relevant found, at rank 2 (k=2): (1/2) / min(3, 2)
    assert metrics.average_precision(["z", "a"], {"a", "b", "c"}, k=2) == pytest.approx(0.25)


def test_ap_ignores_hits_beyond_k():
    assert metrics.average_precision(["x", "y", "a"], {"a"}, k=2) == 0.0
    assert metrics.average_precision(["x", "a"], {"a"}, k=10) == pytest.approx(0.5)


def test_repeated_name_counts_once():
    # a, a, b against {a, b}: hits at 1 and 3 only -> (1 + 2/3) / 2
    assert metrics.average_precision(["a", "a", "b"], {"a", "b"}, k=3) == pytest.approx((1 + 2 / 3) / 2)
    assert metrics.precision_at_k(["a", "a", "a"], {"a"}, k=3) == pytest.approx(1 / 3)


def test_precision_recall_top1():
    ranked = ["a", "x", "b", "y", "c"]
    relevant = {"a", "b", "c", "d"}
    assert metrics.precision_at_k(ranked, relevant, k=5) == pytest.approx(3 / 5)
    assert metrics.recall_at_k(ranked, relevant, k=5) == pytest.approx(3 / 4)
    assert metrics.recall_at_k(ranked, relevant, k=2) == pytest.approx(1 / 4)
    assert metrics.top1(ranked, relevant) == 1.0
    assert metrics.top1(["x", "a"], relevant) == 0.0
    assert metrics.top1([], relevant) == 0.0
    # a list shorter than k: the missing places are misses
    assert metrics.precision_at_k(["a"], {"a"}, k=10) == pytest.approx(0.1)


def test_undefined_without_relevant_items():
    with pytest.raises(ValueError):
        metrics.average_precision(["a"], set(), k=10)


def test_evaluate_means_missing_and_empty_truth():
    truth = {"q1": ["a", "b"], "q2": ["c"], "q3": ["d"], "q4": []}
    results = {"q1": ["a", "x", "b"], "q2": ["x", "c"], "q4": ["a"]}
    ev = metrics.evaluate(results, truth, k=2)
    # q1: AP@2 = 1/1 / min(2,2) = .5, P@2 = .5, R@2 = .5, top1 = 1
    # q2: AP@2 = (1/2) / 1 = .5, P@2 = .5, R@2 = 1, top1 = 0
    # q3: missing -> all 0; q4: no relevant -> left out
    assert ev.queries == 3
    assert ev.map == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert ev.precision == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert ev.recall == pytest.approx((0.5 + 1 + 0) / 3)
    assert ev.top1 == pytest.approx(1 / 3)
    assert ev.missing == ["q3"]
    assert ev.no_relevant == ["q4"]
    d = ev.to_dict()
    assert d["map@2"] == pytest.approx(ev.map) and len(d["per_query"]) == 3
    table = metrics.format_table(ev)
    assert "mAP@2" in table and "0.3333" in table and "q3" in table


def test_evaluate_rejects_queries_missing_from_ground_truth():
    with pytest.raises(UsageError, match=r"2 of 3 queries in the results are not in the ground truth: q8, q9"):
        metrics.evaluate({"q1": ["a"], "q8": [], "q9": []}, {"q1": ["a"]}, k=10)


def test_evaluate_rejects_bad_k():
    with pytest.raises(UsageError, match="--k"):
        metrics.evaluate({}, {"q": ["a"]}, k=0)


@pytest.mark.parametrize("text,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"q.jpg": "a.jpg"}', "entry for 'q.jpg' must be a list"),
    ('{"q.jpg": [1, 2]}', "entry for 'q.jpg' must be a list"),
])
def test_malformed_files_are_rejected_with_a_clear_message(tmp_path, text, message):
    path = tmp_path / "r.json"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        metrics.load_results(path)
    with pytest.raises(UsageError, match=message):
        metrics.load_ground_truth(path)


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        metrics.load_results(tmp_path / "nope.json")


def test_labels_from_folders(tmp_path):
    for rel in ["q/cat/1.jpg", "q/dog/2.png", "g/cat/a.jpg", "g/cat/b.jpg", "g/dog/c.jpg", "g/dog/notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    truth = metrics.labels_from_folders(tmp_path / "q", tmp_path / "g")
    assert truth == {"cat/1.jpg": ["cat/a.jpg", "cat/b.jpg"], "dog/2.png": ["dog/c.jpg"]}
    (tmp_path / "q" / "loose.jpg").write_bytes(b"x")
    with pytest.raises(UsageError, match="not inside a class folder"):
        metrics.labels_from_folders(tmp_path / "q", tmp_path / "g")


def test_roundtrip_json(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"q": ["a", "b"]}))
    assert metrics.load_ground_truth(path) == {"q": ["a", "b"]}
