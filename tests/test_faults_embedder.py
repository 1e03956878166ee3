"""Embedder faults, on real processes:

- the embedder is killed (SIGKILL) in the middle of an `imagesearch index` run:
  the CLI exits non-zero and names every file that was not indexed; a re-run
  with an embedder back completes the gallery, with no duplicates;
- calls whose deadline passes while they wait are dropped by the server
  (counted by the batcher, never run by the model), and the next call is
  answered correctly.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from testkit import ROOT, ServiceProcess, sample_photos
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc, ranker_pb2, ranker_pb2_grpc

TOL = 1e-5
EMBEDDER_ARGS = ("--device", "cpu", "--max-batch", "4", "--max-wait-ms", "2")


def write_gallery(folder: Path, n: int) -> list[str]:
    """n photos under folder/a and folder/b; returns their names (relative paths)."""
    names = []
    for i, data in enumerate(sample_photos(n, max_side=160)):
        name = f"{'ab'[i % 2]}/img-{i:03d}.jpg"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        names.append(name)
    return names


def index_command(gallery: Path, embedder: ServiceProcess, ranker: ServiceProcess) -> list[str]:
    return [sys.executable, "-m", "clients.cli", "index", str(gallery), "--embedder", embedder.address,
            "--ranker", ranker.address, "--collection", "g", "--chunk-size", "4", "--concurrency", "1",
            "--no-progress", "--connect-timeout", "10"]


def stored_count(stub) -> int:
    try:
        (stats,) = stub.GetStats(ranker_pb2.GetStatsRequest(collection="g"), timeout=10).collections
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return 0
        raise
    return stats.count


def not_indexed_section(stderr: str) -> str:
    head, sep, tail = stderr.partition("images not indexed:")
    assert sep, stderr
    return tail


@pytest.mark.slow
def test_embedder_killed_during_index_then_a_rerun_completes_the_gallery(tmp_path):
    gallery = tmp_path / "gallery"
    names = write_gallery(gallery, 64)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("IMAGESEARCH_EMBEDDER", None)
    env.pop("IMAGESEARCH_RANKER", None)
    db = tmp_path / "g.db"
    with ServiceProcess("ranker_service", "--db", str(db)) as ranker, ranker.channel() as channel:
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        # On the CPU, with one thread (testkit.ServiceProcess), so that 64 images take long enough to kill mid-run.
        embedder = ServiceProcess("embedder_service", *EMBEDDER_ARGS)
        try:
            cli = subprocess.Popen(index_command(gallery, embedder, ranker), cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # Kill once two chunks are committed: 14 chunks are still to come.
            deadline = time.monotonic() + 300
            while stored_count(stub) < 8:
                assert cli.poll() is None, "the index run ended before the embedder was killed:\n" + cli.stderr.read()
                assert time.monotonic() < deadline, "no progress"
                time.sleep(0.02)
            embedder.kill()
            out, err = cli.communicate(timeout=300)
        finally:
            embedder.kill()
        first = stored_count(stub)

        assert cli.returncode == 1, err  # a runtime failure, not a usage error
        assert 8 <= first < len(names), first
        assert f"indexed {first} of {len(names)} images" in err, err
        section = not_indexed_section(err)
        assert f"{len(names) - first} images not indexed:" in err
        stored = set(search_all(stub, len(names)))
        assert len(stored) == first
        for name in names:  # every file not indexed is named; no indexed file is
            assert (name in section) == (name not in stored), (name, err)
        assert "UNAVAILABLE" in section and "run the same `imagesearch index` again" in err

        with ServiceProcess("embedder_service", *EMBEDDER_ARGS) as again:
            rerun = subprocess.run(index_command(gallery, again, ranker), cwd=ROOT, env=env, capture_output=True,
                                   text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr
        # The re-run resumes: what was acknowledged is not embedded again.
        assert f"indexed {len(names) - first} of {len(names)} images" in rerun.stderr
        assert f"({len(names) - first} new, 0 replaced)" in rerun.stderr and f"{first} unchanged" in rerun.stderr
        assert stored_count(stub) == len(names)
        everything = search_all(stub, len(names))
        assert sorted(everything) == sorted(names)  # each name once
    assert ranker.proc.returncode == 0
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        total, distinct = conn.execute("SELECT count(*), count(DISTINCT name) FROM vectors").fetchone()
    assert total == distinct == len(names)


def search_all(stub, k: int) -> list[str]:
    """Every name in collection 'g' (a top-k over all of it)."""
    (stats,) = stub.GetStats(ranker_pb2.GetStatsRequest(collection="g"), timeout=10).collections
    query = [1.0] * stats.dim
    return [r.match.name for r in stub.Search(ranker_pb2.SearchRequest(collection="g", vector=query, top_k=k),
                                              timeout=30)]


# ---------------------------------------------------------------- deadlines


STREAM = 96
BLOCKERS = 64  # 8 batches of 8: about 1 s of model time here, 4 x the expiring calls' deadline
EXPIRING = 100


@pytest.mark.slow
def test_calls_whose_deadline_passes_are_dropped_not_run():
    """A stream keeps the model busy and BLOCKERS Embed calls (which go ahead of
    stream items, first come first served among themselves) are queued; 100
    Embed calls with a 0.25 s deadline arrive behind them. The server must drop
    them (count them as dropped, never run them), and answer the next call."""
    photos = sample_photos(STREAM, max_side=160)
    # One engine thread, as before the thread plan gave onnxruntime every core: the blockers must
    # keep the model busy for several times the expiring calls' deadline.
    proc = ServiceProcess("embedder_service", "--device", "cpu", "--max-batch", "8", "--max-wait-ms", "5",
                          "--stream-window", "64", "--decode-workers", "2", "--engine-threads", "1")
    try:
        with proc.channel() as channel:
            stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
            probe = photos[5]
            want = np.asarray(stub.Embed(embedder_pb2.EmbedRequest(image=probe), timeout=120).vector, np.float32)

            first_back = threading.Event()
            streamed: list = []

            def consume():
                requests = (embedder_pb2.EmbedStreamRequest(id=str(i), image=d) for i, d in enumerate(photos))
                for reply in stub.EmbedStream(requests, timeout=600):
                    streamed.append(reply)
                    first_back.set()

            consumer = threading.Thread(target=consume)
            consumer.start()
            assert first_back.wait(300)
            blockers = [stub.Embed.future(embedder_pb2.EmbedRequest(image=photos[i % 8], name=f"early-{i}"),
                                          timeout=300) for i in range(BLOCKERS)]
            expiring = [stub.Embed.future(embedder_pb2.EmbedRequest(image=photos[i % 8], name=f"late-{i}"),
                                          timeout=0.25) for i in range(EXPIRING)]
            codes = [f.exception().code() if f.exception() else grpc.StatusCode.OK for f in expiring]
            assert all(len(f.result().vector) == 1280 for f in blockers)
            still_streaming = len(streamed) < STREAM
            consumer.join(600)
            # The server is not clogged by the expired work: the next call gets the right vector.
            got = np.asarray(stub.Embed(embedder_pb2.EmbedRequest(image=probe), timeout=120).vector, np.float32)
        assert proc.terminate() == 0
    finally:
        proc.kill()
    assert still_streaming, "the stream ended before the expiring calls were answered: make it longer"
    # DEADLINE_EXCEEDED from the client's own timer; CANCELLED when the server's
    # answer for the dropped item ("the caller cancelled or its deadline passed")
    # arrives first, as it can on a busy machine.
    assert set(codes) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}, codes
    assert len(streamed) == STREAM and all(r.WhichOneof("result") == "embedding" for r in streamed)
    assert np.abs(got - want).max() <= TOL

    m = re.search(r"batcher stopped: (\d+) items in (\d+) batches, (\d+) dropped, (\d+) failed to prepare",
                  proc.output)
    assert m, proc.output
    items, batches, dropped, failed = map(int, m.groups())
    run_late = items - (STREAM + BLOCKERS + 2)  # expired calls that the model ran anyway
    assert failed == 0
    assert 0 <= run_late <= EXPIRING // 10, (items, dropped)
    # The expired calls reached the server (most of them: some expire on the
    # way, in the client or in gRPC's queue) and were dropped there.
    assert dropped >= EXPIRING // 4 and dropped + run_late <= EXPIRING, (items, dropped)
