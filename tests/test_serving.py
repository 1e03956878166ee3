"""The shared server plumbing: error mapping, token check, health, reflection,
message limits and graceful stop, on a real in-process server over a real channel."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from imagesearch import errors, serving
from imagesearch.v1 import ranker_pb2, ranker_pb2_grpc

SERVICE = ranker_pb2.DESCRIPTOR.services_by_name["RankerService"].full_name


class FakeRanker(ranker_pb2_grpc.RankerServiceServicer):
    """Raises the domain error named by the request's collection."""

    def GetStats(self, request, context):
        exc = getattr(errors, request.collection, None) if request.collection else None
        if exc is not None:
            raise exc(f"{request.collection} raised for {request.collection!r}")
        return ranker_pb2.GetStatsResponse(max_top_k=1000)

    def Search(self, request, context):
        yield ranker_pb2.SearchResponse(match=ranker_pb2.Match(rank=1, name="a", score=1.0))
        if request.collection == "fail-midway":
            raise errors.NotFound("collection vanished")

    def SearchStream(self, request_iterator, context):
        for req in request_iterator:
            yield ranker_pb2.SearchStreamResponse(id=req.id)

    upserts_entered = threading.Semaphore(0)

    def Upsert(self, request_iterator, context):
        FakeRanker.upserts_entered.release()
        n = sum(1 for _ in request_iterator)
        return ranker_pb2.UpsertResponse(upserted=n)


def register(server):
    ranker_pb2_grpc.add_RankerServiceServicer_to_server(FakeRanker(), server)


@pytest.mark.parametrize("name,code", [
    ("InvalidArgument", grpc.StatusCode.INVALID_ARGUMENT),
    ("InvalidImage", grpc.StatusCode.INVALID_ARGUMENT),
    ("ResourceExhausted", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("NotFound", grpc.StatusCode.NOT_FOUND),
    ("FailedPrecondition", grpc.StatusCode.FAILED_PRECONDITION),
    ("Unavailable", grpc.StatusCode.UNAVAILABLE),
])
def test_domain_errors_map_to_status_codes(grpc_server, name, code):
    _, channel = grpc_server(register, [SERVICE])
    stub = ranker_pb2_grpc.RankerServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetStats(ranker_pb2.GetStatsRequest(collection=name), timeout=5)
    assert info.value.code() == code
    assert name in info.value.details()


def test_error_in_a_server_stream_keeps_what_was_sent(grpc_server):
    _, channel = grpc_server(register, [SERVICE])
    stub = ranker_pb2_grpc.RankerServiceStub(channel)
    call = stub.Search(ranker_pb2.SearchRequest(collection="fail-midway"), timeout=5)
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for r in call:
            got.append(r.match.name)
    assert got == ["a"]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_follows_set_serving_and_graceful_stop(grpc_server):
    running, channel = grpc_server(register, [SERVICE], serving_now=False)
    health = health_pb2_grpc.HealthStub(channel)
    req = health_pb2.HealthCheckRequest(service=SERVICE)
    assert health.Check(req, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
    running.set_serving(True)
    assert health.Check(req, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    running.enter_graceful_shutdown()
    assert health.Check(req, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_the_services(grpc_server):
    _, channel = grpc_server(register, [SERVICE])
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=5)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {SERVICE, serving.HEALTH_SERVICE} <= names


def test_message_limit_is_enforced(grpc_server):
    config = serving.ServerConfig(host="127.0.0.1", port=0, max_message_bytes=1024, grace_s=1)
    _, channel = grpc_server(register, [SERVICE], config=config)
    stub = ranker_pb2_grpc.RankerServiceStub(channel)
    big = ranker_pb2.UpsertRequest(collection="c", name="n", vector=[0.5] * 1000)  # ~4 KB
    with pytest.raises(grpc.RpcError) as info:
        stub.Upsert(iter([big]), timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    small = ranker_pb2.UpsertRequest(collection="c", name="n", vector=[0.5] * 10)
    assert stub.Upsert(iter([small, small]), timeout=5).upserted == 2


class TestToken:
    TOKEN = "s3cret-token"

    def start(self, grpc_server):
        config = serving.ServerConfig(host="127.0.0.1", port=0, auth_token=self.TOKEN, grace_s=1)
        return grpc_server(register, [SERVICE], config=config)

    def test_missing_and_wrong_tokens_are_refused_on_every_kind_of_rpc(self, grpc_server, caplog):
        _, channel = self.start(grpc_server)
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        for metadata in (None, [("authorization", "Bearer nope")], [("authorization", self.TOKEN)]):
            calls = [
                lambda: stub.GetStats(ranker_pb2.GetStatsRequest(), timeout=5, metadata=metadata),
                lambda: list(stub.Search(ranker_pb2.SearchRequest(), timeout=5, metadata=metadata)),
                lambda: stub.Upsert(iter([ranker_pb2.UpsertRequest()]), timeout=5, metadata=metadata),
                lambda: list(stub.SearchStream(iter([ranker_pb2.SearchStreamRequest()]), timeout=5,
                                               metadata=metadata)),
            ]
            for call in calls:
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert self.TOKEN not in caplog.text

    def test_right_token_passes_and_health_is_open(self, grpc_server):
        _, channel = self.start(grpc_server)
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        md = [("authorization", f"Bearer {self.TOKEN}")]
        assert stub.GetStats(ranker_pb2.GetStatsRequest(), timeout=5, metadata=md).max_top_k == 1000
        assert stub.Upsert(iter([ranker_pb2.UpsertRequest()]), timeout=5, metadata=md).upserted == 1
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_calls_past_the_concurrency_cap_are_refused_at_once(grpc_server):
    config = serving.ServerConfig(host="127.0.0.1", port=0, max_concurrent_rpcs=2, grace_s=1)
    _, channel = grpc_server(register, [SERVICE], config=config)
    stub = ranker_pb2_grpc.RankerServiceStub(channel)
    release = threading.Event()

    def held_open():
        yield ranker_pb2.UpsertRequest()
        release.wait(10)

    while FakeRanker.upserts_entered.acquire(blocking=False):
        pass
    open_calls = [stub.Upsert.future(held_open(), timeout=20) for _ in range(2)]
    try:
        for _ in open_calls:  # both streams are running in the server
            assert FakeRanker.upserts_entered.acquire(timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetStats(ranker_pb2.GetStatsRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        release.set()
    assert [f.result().upserted for f in open_calls] == [1, 1]
    assert stub.GetStats(ranker_pb2.GetStatsRequest(), timeout=5).max_top_k == 1000


def test_server_flags_parse_with_env_defaults(monkeypatch):
    import argparse

    monkeypatch.setenv("X_PORT", "5999")
    monkeypatch.setenv("X_MAX_CONCURRENT_RPCS", "7")
    parser = argparse.ArgumentParser()
    serving.add_server_arguments(parser, env_prefix="X", default_port=1)
    config = serving.ServerConfig.from_args(parser.parse_args([]))
    assert (config.port, config.max_concurrent_rpcs) == (5999, 7)
    with pytest.raises(SystemExit, match="go together"):
        serving.ServerConfig.from_args(parser.parse_args(["--tls-cert", "c.pem"]))
    with pytest.raises(SystemExit, match="max-concurrent-rpcs"):
        serving.ServerConfig.from_args(parser.parse_args(["--max-concurrent-rpcs", "-1"]))
