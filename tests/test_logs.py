"""`--log-format json` (and IMAGESEARCH_LOG_FORMAT=json): every line the ranker,
the embedder and the trainer write is one JSON object with the same keys:
time, level, logger, message, method, code, peer, duration."""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import subprocess
import sys

import pytest

from imagesearch import logs
from testkit import ROOT, ServiceProcess

KEYS = ["time", "level", "logger", "message", "method", "code", "peer", "duration"]


def parse_lines(text: str) -> list[dict]:
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert list(record)[:len(KEYS)] == KEYS, record
        assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        datetime.datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
        records.append(record)
    return records


def test_formatter_writes_one_object_with_call_fields_and_exceptions():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter(static={"rank": 1}))
    log = logging.getLogger("test.logs.formatter")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("%s -> %s", "/x.Y/Z", "NOT_FOUND",
                    extra={"method": "/x.Y/Z", "code": "NOT_FOUND", "peer": "ipv4:127.0.0.1:5", "duration": 0.25})
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            log.exception("failed: %r", "é")
    finally:
        log.removeHandler(handler)
    first, second = parse_lines(stream.getvalue())
    assert first["message"] == "/x.Y/Z -> NOT_FOUND" and first["logger"] == "test.logs.formatter"
    assert (first["method"], first["code"], first["peer"], first["duration"]) == \
        ("/x.Y/Z", "NOT_FOUND", "ipv4:127.0.0.1:5", 0.25)
    assert first["rank"] == 1 and first["time"].endswith("Z")
    assert second["level"] == "ERROR" and second["method"] is None and "ValueError: boom" in second["exception"]
    assert second["message"] == "failed: 'é'"


def test_ranker_logs_json_lines(tmp_path):
    with ServiceProcess("ranker_service", "--db", str(tmp_path / "r.db"), "--log-format", "json") as ranker:
        pass
    records = parse_lines(ranker.output)
    messages = [r["message"] for r in records]
    assert any(m.startswith("listening on 127.0.0.1:") for m in messages), messages
    assert any(r["logger"] == "ranker_service" for r in records)


@pytest.mark.slow
def test_embedder_logs_json_lines_when_the_environment_says_so():
    with ServiceProcess("embedder_service", env={"IMAGESEARCH_LOG_FORMAT": "json"}) as embedder:
        pass
    messages = [r["message"] for r in parse_lines(embedder.output)]
    assert any(m.startswith("serving imagesearch.v1.EmbedderService") for m in messages), messages


def test_a_bad_log_format_in_the_environment_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ranker_service", "--port", "0", "--db", str(tmp_path / "r.db")],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "IMAGESEARCH_LOG_FORMAT": "xml"})
    assert proc.returncode != 0 and "--log-format 'xml'" in proc.stderr


@pytest.mark.slow
def test_trainer_logs_json_lines_and_no_progress_bars(tmp_path):
    from tests.helpers import make_dataset
    from tests.test_trainer import tiny_args

    data = make_dataset(tmp_path / "data")
    argv = [a if a != "WARNING" else "INFO" for a in tiny_args(data, tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-m", "trainer", *argv, "--log-format", "json"], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "IMAGESEARCH_TORCH_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    records = parse_lines(proc.stderr)
    assert any(r["logger"].startswith("trainer") and "epoch 1" in r["message"] for r in records), records


def test_every_call_is_an_access_line_with_method_code_peer_and_duration(tmp_path):
    import grpc

    from imagesearch.v1 import ranker_pb2, ranker_pb2_grpc

    with ServiceProcess("ranker_service", "--db", str(tmp_path / "r.db"), "--log-format", "json",
                        "--log-level", "DEBUG") as ranker, ranker.channel() as channel:
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        stub.GetStats(ranker_pb2.GetStatsRequest(), timeout=10)
        with pytest.raises(grpc.RpcError):
            list(stub.Search(ranker_pb2.SearchRequest(collection="nope", vector=[1.0, 0.0]), timeout=10))
    calls = [r for r in parse_lines(ranker.output) if r["logger"] == "imagesearch.access"]
    by_method = {r["method"]: r for r in calls}
    stats = by_method["/imagesearch.v1.RankerService/GetStats"]
    search = by_method["/imagesearch.v1.RankerService/Search"]
    assert (stats["level"], stats["code"]) == ("DEBUG", "OK")
    assert (search["level"], search["code"]) == ("INFO", "NOT_FOUND")
    for r in (stats, search):
        assert r["peer"].startswith("ipv4:127.0.0.1:") and 0 < r["duration"] < 10
