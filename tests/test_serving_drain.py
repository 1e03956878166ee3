"""The SIGTERM drain on a real ranker process (imagesearch/serving/drain.py):
health NOT_SERVING, new calls refused with UNAVAILABLE (which clients retry),
never CANCELLED; the call in flight finishes; the process stops as soon as it
has nothing left to finish; a client's retries then fail clearly, or reach the
server started again on the same port."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.channels import RetryPolicy
from clients.errors import ServiceUnavailable
from clients.ranker import RankerClient
from testkit import ServiceProcess
from imagesearch.v1 import ranker_pb2 as pb
from imagesearch.v1 import ranker_pb2_grpc

DIM = 8
GRACE_S = 30


def _wait_not_serving(health, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING:
            return
        time.sleep(0.02)
    raise AssertionError("health never said NOT_SERVING after SIGTERM")


@pytest.mark.slow
def test_a_draining_server_answers_unavailable_and_finishes_what_runs(tmp_path):
    db = tmp_path / "drain.db"
    first = ServiceProcess("ranker_service", "--db", db, "--grace", GRACE_S)
    port = first.port
    release = threading.Event()
    held: dict[str, object] = {}

    def upsert_held_open():
        yield pb.UpsertRequest(collection="c", name="held", vector=np.ones(DIM).tolist())
        release.wait(60)
        yield pb.UpsertRequest(collection="c", name="held2", vector=np.arange(1, DIM + 1).tolist())

    try:
        with first.channel(options=[("grpc.enable_retries", 0)]) as channel:
            stub = ranker_pb2_grpc.RankerServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            in_flight = stub.Upsert.future(upsert_held_open(), timeout=120)
            time.sleep(0.5)  # the Upsert is running in the server
            first.proc.send_signal(signal.SIGTERM)
            _wait_not_serving(health)
            refused_at = time.monotonic()
            codes = []
            for _ in range(20):  # new calls, for a while: each refused with UNAVAILABLE, none cancelled
                with pytest.raises(grpc.RpcError) as info:
                    stub.GetStats(pb.GetStatsRequest(), timeout=5)
                codes.append((info.value.code(), info.value.details()))
                time.sleep(0.05)
            assert {c for c, _ in codes} == {grpc.StatusCode.UNAVAILABLE}, codes
            assert "shutting down" in codes[0][1], codes[0]
            # A client with the default retry policy retries and then says clearly what is wrong.
            with RankerClient(first.address, timeout=20) as client:
                with pytest.raises(ServiceUnavailable, match="shutting down"):
                    client.stats()
            assert first.proc.poll() is None, "the server stopped with a call still in flight"
            release.set()  # the call in flight finishes, within the grace
            held["upserted"] = in_flight.result(timeout=60).upserted
        assert first.proc.wait(GRACE_S) == 0, first.output
        stopped_after = time.monotonic() - refused_at
    finally:
        release.set()
        first.kill()
    assert held["upserted"] == 2
    assert stopped_after < GRACE_S / 2, stopped_after  # it stopped once idle, not at the end of the grace
    assert "cancelling them" not in first.output, first.output

    # Started again on the same port and database: a retrying client gets through.
    with ServiceProcess("ranker_service", "--db", db, "--port", port) as second:
        with RankerClient(second.address, timeout=20, retry=RetryPolicy(initial_backoff_s=0.5)) as client:
            assert client.stats("c").collection("c").count == 2
        assert second.terminate() == 0, second.output


@pytest.mark.slow
def test_calls_still_running_at_the_end_of_the_grace_are_cancelled_and_logged(tmp_path):
    proc = ServiceProcess("ranker_service", "--db", tmp_path / "g.db", "--grace", "1")
    release = threading.Event()

    def never_ends():
        yield pb.UpsertRequest(collection="c", name="a", vector=np.ones(DIM).tolist())
        release.wait(60)

    try:
        with proc.channel() as channel:
            call = ranker_pb2_grpc.RankerServiceStub(channel).Upsert.future(never_ends(), timeout=60)
            time.sleep(0.5)
            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(20) == 0, proc.output
            assert call.exception(timeout=20) is not None
    finally:
        release.set()
        proc.kill()
    assert "1 calls still running after 1.0 s: cancelling them" in proc.output, proc.output
