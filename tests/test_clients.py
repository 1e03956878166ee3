"""The client library over real channels to in-process servers built with the
project's `build_server`: gRPC's retry on UNAVAILABLE, deadlines, the bearer
token, TLS, message limits from GetModelInfo, out-of-order stream answers,
round_robin over two servers, and clear errors for an unreachable service."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import numpy as np
import pytest

from clients.channels import FAST_UNARY_STREAM, RetryPolicy, Security, channel_options, resolve_target
from clients.embedder import EmbedderClient, ImageSource
from clients.errors import ClientError, ServiceUnavailable, UsageError
from clients.ranker import RankerClient
from imagesearch import errors, serving
from imagesearch.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc, ranker_pb2, ranker_pb2_grpc

EMBEDDER = embedder_pb2.DESCRIPTOR.services_by_name["EmbedderService"].full_name
RANKER = ranker_pb2.DESCRIPTOR.services_by_name["RankerService"].full_name


def vector_for(data: bytes, dim: int = 4) -> list[float]:
    v = np.frombuffer(data.ljust(dim, b"\0")[:dim], dtype=np.uint8).astype(np.float32) + 1
    return (v / np.linalg.norm(v)).tolist()


class FakeEmbedder(embedder_pb2_grpc.EmbedderServiceServicer):
    """Answers streams in reverse order; b"bad" is an undecodable image;
    the first `unavailable` calls of any method fail with UNAVAILABLE."""

    def __init__(self, *, unavailable: int = 0, max_message_bytes: int = 1 << 20, delay_s: float = 0.0,
                 tag: str = "fp", cancelled: int = 0):
        self.unavailable = unavailable
        self.cancelled = cancelled
        self.max_message_bytes = max_message_bytes
        self.delay_s = delay_s
        self.tag = tag
        self.calls: list[str] = []
        self.metadata: list[dict] = []
        self.lock = threading.Lock()

    def _enter(self, method, context):
        with self.lock:
            self.calls.append(method)
            self.metadata.append(dict(context.invocation_metadata()))
            if self.unavailable > 0:
                self.unavailable -= 1
                raise errors.Unavailable("still loading")
            if self.cancelled > 0:  # as a server in its graceful stop answers a call it never ran
                self.cancelled -= 1
                context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
        if self.delay_s:
            time.sleep(self.delay_s)

    def GetModelInfo(self, request, context):
        self._enter("GetModelInfo", context)
        return embedder_pb2.GetModelInfoResponse(backbone="fake", dim=4, fingerprint=self.tag,
                                                 max_message_bytes=self.max_message_bytes, max_image_bytes=10_000,
                                                 max_streams=3, stream_window=16)

    def Embed(self, request, context):
        self._enter("Embed", context)
        if request.image == b"bad":
            raise errors.InvalidImage(f"{request.name or 'image'}: not an image")
        return embedder_pb2.EmbedResponse(vector=vector_for(request.image), fingerprint=self.tag)

    def EmbedStream(self, request_iterator, context):
        self._enter("EmbedStream", context)
        requests = list(request_iterator)
        for req in reversed(requests):
            if req.image == b"bad":
                code, message = serving.item_error_fields(errors.InvalidImage(f"{req.id}: not an image"))
                yield embedder_pb2.EmbedStreamResponse(id=req.id, error=common_pb2.ItemError(code=code, message=message),
                                                       fingerprint=self.tag)
            else:
                yield embedder_pb2.EmbedStreamResponse(
                    id=req.id, embedding=embedder_pb2.Embedding(vector=vector_for(req.image)), fingerprint=self.tag)


class FakeRanker(ranker_pb2_grpc.RankerServiceServicer):
    def __init__(self):
        self.items: dict[str, list[float]] = {}
        self.metadata: list[dict] = []

    def Upsert(self, request_iterator, context):
        self.metadata.append(dict(context.invocation_metadata()))
        n = 0
        for req in request_iterator:
            self.items[req.name] = list(req.vector)
            n += 1
        return ranker_pb2.UpsertResponse(upserted=n, inserted=n)

    def Search(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        q = np.asarray(request.vector)
        scored = sorted(((-float(np.dot(q, v)), name) for name, v in self.items.items()))
        for rank, (score, name) in enumerate(scored[:request.top_k or 10], start=1):
            yield ranker_pb2.SearchResponse(match=ranker_pb2.Match(rank=rank, name=name, score=-score))


def start(grpc_server, *servicers, config=None):
    def register(server):
        for s in servicers:
            if isinstance(s, FakeEmbedder):
                embedder_pb2_grpc.add_EmbedderServiceServicer_to_server(s, server)
            else:
                ranker_pb2_grpc.add_RankerServiceServicer_to_server(s, server)
    running, _ = grpc_server(register, [EMBEDDER, RANKER], config=config)
    return f"127.0.0.1:{running.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- retry, deadlines, readiness


def test_unavailable_is_retried_by_grpc(grpc_server):
    fake = FakeEmbedder(unavailable=2)
    with EmbedderClient(start(grpc_server, fake), timeout=10) as client:
        info = client.model_info()
    assert (info.backbone, info.max_streams, info.stream_window) == ("fake", 3, 16)
    assert fake.calls == ["GetModelInfo"] * 3  # two UNAVAILABLE, then the answer


def test_cancelled_sent_by_a_server_is_not_retried(grpc_server):
    # A draining server answers UNAVAILABLE (tests/test_serving_drain.py); CANCELLED may be
    # a call the server ran and cut at the end of its grace: not safe to run again.
    fake = FakeEmbedder(cancelled=1)
    with EmbedderClient(start(grpc_server, fake), timeout=10) as client:
        with pytest.raises(ClientError, match="CANCELLED"):
            client.model_info()
        assert client.model_info().backbone == "fake"
    assert fake.calls == ["GetModelInfo"] * 2


def test_without_retries_unavailable_is_a_clear_error(grpc_server):
    fake = FakeEmbedder(unavailable=1)
    with EmbedderClient(start(grpc_server, fake), timeout=10, retry=None) as client:
        with pytest.raises(ServiceUnavailable, match=r"is it running\? start it with `imagesearch serve"):
            client.model_info()
    assert fake.calls == ["GetModelInfo"]


def test_retries_give_up_after_max_attempts(grpc_server):
    fake = FakeEmbedder(unavailable=10)
    with EmbedderClient(start(grpc_server, fake), timeout=10,
                        retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01)) as client:
        with pytest.raises(ServiceUnavailable):
            client.model_info()
    assert len(fake.calls) == 3


def test_every_call_has_a_deadline(grpc_server):
    fake = FakeEmbedder(delay_s=1.5)
    with EmbedderClient(start(grpc_server, fake), timeout=0.3) as client:
        with pytest.raises(ClientError, match="did not answer in time.*--timeout") as info:
            client.model_info()
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.exit_code == 1


def test_unreachable_service_says_how_to_start_it():
    with EmbedderClient(f"127.0.0.1:{free_port()}", timeout=2) as client:
        t0 = time.monotonic()
        with pytest.raises(ServiceUnavailable, match=r"cannot reach the embedder.*is it running\? "
                                                     r"start it with `imagesearch serve"):
            client.wait_ready(connect_timeout=1.0)
        assert time.monotonic() - t0 < 10


def test_wait_ready_waits_for_serving(grpc_server):
    fake = FakeEmbedder()
    holder = {}

    def register(server):
        embedder_pb2_grpc.add_EmbedderServiceServicer_to_server(fake, server)

    running, _ = grpc_server(register, [EMBEDDER], serving_now=False)
    holder["timer"] = threading.Timer(0.8, running.set_serving, args=(True,))
    holder["timer"].start()
    t0 = time.monotonic()
    with EmbedderClient(f"127.0.0.1:{running.port}") as client:
        client.wait_ready(connect_timeout=0.5, ready_timeout=10)  # answers NOT_SERVING, then SERVING
    assert time.monotonic() - t0 >= 0.7


# ---------------------------------------------------------------- streams and limits


def test_embed_stream_matches_out_of_order_answers_by_id(grpc_server):
    fake = FakeEmbedder()
    items = [ImageSource(f"img{i}", (lambda i=i: bytes([i + 1]) * 8)) for i in range(5)]
    items.insert(2, ImageSource("broken", lambda: b"bad"))
    with EmbedderClient(start(grpc_server, fake)) as client:
        results = {r.name: r for r in client.embed_stream(items)}
    assert set(results) == {i.name for i in items}
    for i in range(5):
        assert np.allclose(results[f"img{i}"].vector, vector_for(bytes([i + 1]) * 8), atol=1e-6)
    assert not results["broken"].ok
    assert results["broken"].code == grpc.StatusCode.INVALID_ARGUMENT
    assert "broken: not an image" in results["broken"].message


def test_unreadable_item_gets_an_error_and_the_rest_go_on(grpc_server):
    def fail():
        raise FileNotFoundError(2, "No such file or directory")

    with EmbedderClient(start(grpc_server, FakeEmbedder())) as client:
        results = {r.name: r for r in client.embed_stream([ImageSource("gone.jpg", fail),
                                                         ImageSource("ok.jpg", lambda: b"abcd")])}
    assert results["ok.jpg"].ok
    assert "cannot read gone.jpg: No such file or directory" in results["gone.jpg"].message


def test_embed_many_uses_one_stream_per_chunk(grpc_server):
    fake = FakeEmbedder()
    items = [ImageSource(f"{i:02d}", (lambda i=i: bytes([i + 1]) * 4)) for i in range(10)]
    with EmbedderClient(start(grpc_server, fake)) as client:
        results = list(client.embed_many(items, chunk_size=3, concurrency=2))
    assert sorted(r.name for r in results) == [i.name for i in items]
    assert all(r.ok for r in results)
    assert fake.calls.count("EmbedStream") == 4


def test_message_limit_comes_from_model_info(grpc_server):
    fake = FakeEmbedder(max_message_bytes=2000)
    with EmbedderClient(start(grpc_server, fake)) as client:
        assert client.max_message_bytes == 64 << 20
        client.model_info()
        assert client.max_message_bytes == 2000
        assert client.embed(b"x" * 100).ok
        with pytest.raises(UsageError, match="RESOURCE_EXHAUSTED"):
            client.embed(b"x" * 5000)  # refused by this channel before it is sent
    assert fake.calls.count("Embed") == 1


def test_bad_image_is_a_usage_error_naming_it(grpc_server):
    with EmbedderClient(start(grpc_server, FakeEmbedder())) as client:
        with pytest.raises(UsageError, match="cat.jpg: not an image") as info:
            client.embed(b"bad", name="cat.jpg")
    assert info.value.exit_code == 2


# ---------------------------------------------------------------- token and TLS


def test_token_is_sent_on_every_call(grpc_server):
    emb, rank = FakeEmbedder(), FakeRanker()
    config = serving.ServerConfig(host="127.0.0.1", port=0, grace_s=1.0, auth_token="s3cret")
    address = start(grpc_server, emb, rank, config=config)
    security = Security(auth_token="s3cret")
    with EmbedderClient(address, security=security) as e, RankerClient(address, security=security) as r:
        e.wait_ready()
        e.model_info()
        e.embed(b"abcd")
        list(e.embed_stream([ImageSource("a", lambda: b"abcd")]))
        r.upsert("c", [("a", [1.0, 0, 0, 0])], fingerprint="fp")
        assert [m.name for m in r.search("c", [1.0, 0, 0, 0])] == ["a"]
    assert all(m.get("authorization") == "Bearer s3cret" for m in emb.metadata + rank.metadata)
    assert len(emb.metadata) == 3 and len(rank.metadata) == 2


def test_missing_token_says_what_to_do(grpc_server):
    config = serving.ServerConfig(host="127.0.0.1", port=0, grace_s=1.0, auth_token="s3cret")
    address = start(grpc_server, FakeEmbedder(), config=config)
    with EmbedderClient(address) as client:
        client.wait_ready()  # health needs no token
        with pytest.raises(UsageError, match="refused the call.*--auth-token"):
            client.model_info()


def test_mutual_tls_with_token(tmp_path):
    certs = pytest.importorskip("tests.certs")
    pki = certs.make_pki(tmp_path)
    fake = FakeEmbedder()
    config = serving.ServerConfig(host="127.0.0.1", port=0, grace_s=1.0, auth_token="t", tls_cert=pki.server_cert,
                                  tls_key=pki.server_key, tls_client_ca=pki.ca)
    running = serving.build_server(config, lambda s: embedder_pb2_grpc.add_EmbedderServiceServicer_to_server(fake, s),
                                   [EMBEDDER])
    running.set_serving(True)
    try:
        address = f"127.0.0.1:{running.port}"
        good = Security(ca=pki.ca, cert=pki.client_cert, key=pki.client_key, auth_token="t")
        with EmbedderClient(address, security=good) as client:
            client.wait_ready()
            assert client.model_info().backbone == "fake"
        assert fake.metadata[-1]["authorization"] == "Bearer t"
        with EmbedderClient(address, security=Security(ca=pki.ca, auth_token="t"), timeout=3,
                            retry=None) as no_cert:
            with pytest.raises(ClientError):
                no_cert.model_info()
        with pytest.raises(UsageError, match="--tls-cert and --tls-key go together"):
            EmbedderClient(address, security=Security(cert=pki.client_cert))
    finally:
        running.stop(0).wait()


def test_missing_ca_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="cannot read --tls-ca file"):
        EmbedderClient("127.0.0.1:1", security=Security(ca=tmp_path / "none.pem"))


# ---------------------------------------------------------------- targets and round_robin


@pytest.mark.parametrize("given,target", [
    ("127.0.0.1:50051", "127.0.0.1:50051"),
    ("embedder.internal:50051", "embedder.internal:50051"),
    ("127.0.0.1:1,127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2"),
    ("localhost:1, 10.0.0.2:2", "ipv4:127.0.0.1:1,10.0.0.2:2"),
    ("[::1]:1,[::1]:2", "ipv6:[::1]:1,[::1]:2"),
    ("dns:///embedder:50051", "dns:///embedder:50051"),
])
def test_resolve_target(given, target):
    assert resolve_target(given) == target


@pytest.mark.parametrize("bad", ["", "nohost", "a:b", "host-a:1,host-b:2", "127.0.0.1:1,[::1]:2", "1.2.3.4:70000"])
def test_bad_addresses(bad):
    with pytest.raises(UsageError):
        resolve_target(bad)


def test_ranker_takes_one_address():
    with pytest.raises(UsageError, match="one address"):
        RankerClient("127.0.0.1:1,127.0.0.1:2")


def test_round_robin_spreads_calls_and_streams_over_replicas(grpc_server):
    a, b = FakeEmbedder(tag="a"), FakeEmbedder(tag="b")
    address = f"{start(grpc_server, a)},{start(grpc_server, b)}"
    items = [ImageSource(str(i), (lambda i=i: bytes([i + 1]) * 4)) for i in range(16)]
    with EmbedderClient(address) as client:
        client.wait_ready()
        # round_robin connects to every replica as they become ready; a few calls settle it
        tags = [client.embed(b"abcd").fingerprint for _ in range(20)]
        streamed = list(client.embed_many(items, chunk_size=2))
    assert tags.count("a") >= 5 and tags.count("b") >= 5
    assert {r.fingerprint for r in streamed} == {"a", "b"}
    assert a.calls.count("EmbedStream") + b.calls.count("EmbedStream") == 8


@pytest.mark.slow
def test_round_robin_over_two_embedder_processes():
    """Two real embedder processes behind one `ipv4:` target: both get calls
    and streams. They differ only in ways the answers show: B serves random
    weights (another fingerprint) and a smaller max batch."""
    from testkit import ServiceProcess

    a = ServiceProcess("embedder_service", "--backbone", "efficientnet_lite0", "--max-batch", "8")
    try:
        b = ServiceProcess("embedder_service", "--backbone", "efficientnet_lite0", "--weights", "none",
                           "--max-batch", "4")
        try:
            from clients.cli.demo import find_photos

            photo = find_photos()[0].read_bytes()
            items = [ImageSource(str(i), lambda: photo) for i in range(8)]
            # Both serving first: a replica still loading its model (B exports its random
            # weights to ONNX) answers UNAVAILABLE, and the retry then lands on the other.
            for port in (a.port, b.port):
                with EmbedderClient(f"127.0.0.1:{port}", timeout=120) as one:
                    one.wait_ready()
            with EmbedderClient(f"127.0.0.1:{a.port},127.0.0.1:{b.port}", timeout=60) as client:
                client.wait_ready()  # one replica ready; round_robin adds the other once connected
                batches, deadline = set(), time.monotonic() + 30
                while batches != {8, 4} and time.monotonic() < deadline:
                    batches |= {client.model_info(refresh=True).max_batch for _ in range(10)}
                fingerprints = {r.fingerprint for r in client.embed_many(items, chunk_size=1, concurrency=4)}
            assert batches == {8, 4}
            assert len(fingerprints) == 2
        finally:
            b.terminate()
    finally:
        a.terminate()


# ---------------------------------------------------------------- vectors on the wire


@pytest.mark.parametrize("vector", [np.linspace(-1, 1, 1280, dtype=np.float32), np.arange(7, dtype=np.float64) / 3,
                                    [0.5, -0.25, 1e-30], np.float32([[1, 2], [3, 4]]), []])
def test_vectors_go_as_the_same_bytes_as_a_list_of_floats(vector):
    from clients import wire

    as_list = np.asarray(vector, dtype=np.float32).ravel().tolist()
    for message in (ranker_pb2.UpsertRequest(collection="c", name="a", fingerprint="f"),
                    ranker_pb2.SearchStreamRequest(id="q", collection="c", top_k=3)):
        expected = type(message)()
        expected.CopyFrom(message)
        expected.vector.extend(as_list)
        assert wire.set_vector(message, vector).SerializeToString() == expected.SerializeToString()
        assert wire.vector(message.vector).dtype == np.float32
        assert wire.vector(message.vector).tolist() == as_list
    with pytest.raises(TypeError):
        wire.set_vector(ranker_pb2.DeleteRequest(), [1.0], field="names")


def test_client_channels_read_streamed_answers_on_the_calling_thread():
    # What a Search saves: bench/results/ranker.md#grpc-search-with-paging; every Search test here runs with it.
    options = channel_options(["imagesearch.v1.RankerService"], retry=RetryPolicy(), max_message_bytes=1 << 20)
    assert FAST_UNARY_STREAM == [("SingleThreadedUnaryStream", 1)] and FAST_UNARY_STREAM[0] in options
