"""TLS, mutual TLS and bearer tokens on a real server process (the ranker:
it starts in a second). Certificates are generated at test time."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from testkit import ServiceProcess
from imagesearch.v1 import ranker_pb2, ranker_pb2_grpc
from tests.certs import make_pki

TOKEN = "tok-3f9a1c0e5d7b"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), "good")


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki-other"), "other")


def tls_credentials(pki, client_pki=None, token=None):
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=client_pki.client_key.read_bytes() if client_pki else None,
        certificate_chain=client_pki.client_cert.read_bytes() if client_pki else None,
    )
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds


def stats(channel, **kw):
    return ranker_pb2_grpc.RankerServiceStub(channel).GetStats(ranker_pb2.GetStatsRequest(), timeout=5, **kw)


def refused_code(channel, **kw):
    with pytest.raises(grpc.RpcError) as info:
        stats(channel, **kw)
    return info.value.code()


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    db = tmp_path_factory.mktemp("tls") / "g.db"
    proc = ServiceProcess("ranker_service", "--db", db, "--tls-cert", pki.server_cert, "--tls-key", pki.server_key,
                          credentials=tls_credentials(pki))
    yield proc
    proc.terminate()


def test_tls_works(tls_server):
    with tls_server.channel() as ch:
        assert stats(ch).max_top_k > 0


def test_plaintext_to_a_tls_port_fails(tls_server):
    with grpc.insecure_channel(tls_server.address) as ch:
        assert refused_code(ch) == grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_ca_fails(tls_server, other_pki):
    with grpc.secure_channel(tls_server.address, tls_credentials(other_pki)) as ch:
        assert refused_code(ch) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_from_the_trusted_ca(pki, other_pki, tmp_path):
    proc = ServiceProcess("ranker_service", "--db", tmp_path / "m.db", "--tls-cert", pki.server_cert,
                          "--tls-key", pki.server_key, "--tls-client-ca", pki.ca,
                          credentials=tls_credentials(pki, client_pki=pki))
    try:
        with proc.channel() as ch:
            assert stats(ch).max_top_k > 0
        with grpc.secure_channel(proc.address, tls_credentials(pki)) as ch:  # no client certificate
            assert refused_code(ch) == grpc.StatusCode.UNAVAILABLE
        with grpc.secure_channel(proc.address, tls_credentials(pki, client_pki=other_pki)) as ch:
            assert refused_code(ch) == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.terminate()


def test_tokens_over_plaintext_and_health_stays_open(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    proc = ServiceProcess("ranker_service", "--db", tmp_path / "t.db", "--auth-token-file", token_file)
    try:
        with proc.channel() as ch:
            assert refused_code(ch) == grpc.StatusCode.UNAUTHENTICATED
            assert refused_code(ch, metadata=[("authorization", "Bearer wrong")]) == grpc.StatusCode.UNAUTHENTICATED
            assert refused_code(ch, metadata=[("authorization", TOKEN)]) == grpc.StatusCode.UNAUTHENTICATED
            assert stats(ch, metadata=[("authorization", f"Bearer {TOKEN}")]).max_top_k > 0
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.terminate()
    assert TOKEN not in proc.output, "the token must never reach the log"
    assert "refused" in proc.output


def test_token_and_tls_together(pki, tmp_path):
    proc = ServiceProcess("ranker_service", "--db", tmp_path / "b.db", "--tls-cert", pki.server_cert,
                          "--tls-key", pki.server_key, "--auth-token", TOKEN, credentials=tls_credentials(pki))
    try:
        with grpc.secure_channel(proc.address, tls_credentials(pki, token=TOKEN)) as ch:
            assert stats(ch).max_top_k > 0
        with proc.channel() as ch:
            assert refused_code(ch) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        proc.terminate()
