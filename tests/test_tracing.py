"""OpenTelemetry: off by default; with OTEL_TRACES_EXPORTER=console every
process writes its spans as JSON lines, and one `imagesearch index` and one
`imagesearch query` each make one trace that spans the CLI, the embedder
and the ranker (the services are child processes, so their spans are read
from their output, not from an in-memory exporter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from testkit import ROOT, ServiceProcess, sample_photos

TRACING = {"OTEL_TRACES_EXPORTER": "console"}


def spans(text: str) -> list[dict]:
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"context"' in line and '"trace_id"' in line:
            found.append(json.loads(line))
    return found


def by_trace(all_spans: list[dict]) -> dict[str, list[dict]]:
    traces: dict[str, list[dict]] = {}
    for span in all_spans:
        traces.setdefault(span["context"]["trace_id"], []).append(span)
    return traces


def service_of(span: dict) -> str:
    return span["resource"]["attributes"]["service.name"]


@pytest.mark.slow
def test_one_trace_spans_the_cli_the_embedder_and_the_ranker(tmp_path):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for i, data in enumerate(sample_photos(4, max_side=160)):
        (gallery / f"g{i}.jpg").write_bytes(data)
    env = {**os.environ, **TRACING}
    for key in ("IMAGESEARCH_EMBEDDER", "IMAGESEARCH_RANKER", "OTEL_SERVICE_NAME"):
        env.pop(key, None)
    with ServiceProcess("ranker_service", "--db", str(tmp_path / "r.db"), env=TRACING) as ranker, \
            ServiceProcess("embedder_service", "--max-wait-ms", "1", env=TRACING) as embedder:
        cli = []
        for command in (["index", str(gallery)], ["query", str(gallery), "--out", str(tmp_path / "r.json")]):
            proc = subprocess.run([sys.executable, "-m", "clients.cli", *command, "--embedder", embedder.address,
                                   "--ranker", ranker.address, "--no-progress"], check=False, cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
            cli.append(proc.stderr)
    services = {"imagesearch-embedder": spans(embedder.output), "imagesearch-ranker": spans(ranker.output)}
    for command, text in zip(("index", "query"), cli):
        mine = spans(text)
        (root,) = [s for s in mine if s["name"] == f"imagesearch {command}"]
        assert root["parent_id"] is None and service_of(root) == "imagesearch-cli"
        trace = root["context"]["trace_id"]
        client_calls = {s["name"] for s in mine if s["context"]["trace_id"] == trace and s["kind"] == "SpanKind.CLIENT"}
        for service, its_spans in services.items():
            served = [s for s in its_spans if s["context"]["trace_id"] == trace]
            assert served, f"{service} has no span of the `imagesearch {command}` trace"
            assert all(s["kind"] == "SpanKind.SERVER" and service_of(s) == service for s in served)
            assert all(s["parent_id"] for s in served), "each server span continues a caller's span"
            # A client span ends when its call's answer stream is read to the end, which the CLI may
            # leave to garbage collection: at least one served call's client span is in the CLI's output.
            assert any(c["context"]["span_id"] == s["parent_id"] for s in served for c in mine), \
                [s["name"] for s in served]
            assert {s["name"] for s in served} & client_calls
    assert len(by_trace(spans(cli[0]))) == 1, "index is one trace"


def test_tracing_is_off_without_the_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    with ServiceProcess("ranker_service", "--db", str(tmp_path / "r.db"), env=env) as ranker:
        pass
    assert not spans(ranker.output) and "tracing on" not in ranker.output
