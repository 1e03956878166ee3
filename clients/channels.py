"""gRPC channel plumbing for the clients: targets, service config (retry and
round_robin), TLS, the bearer token, and waiting for a server to be ready.

Everything here is gRPC's own machinery configured once: retries on
UNAVAILABLE come from the channel's service config (`methodConfig.retryPolicy`),
several embedder replicas are balanced by gRPC's `round_robin` policy over an
`ipv4:` target that lists them all, and the token rides on every call as
`authorization: Bearer <token>` metadata through one client interceptor.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.errors import ServiceUnavailable, UsageError
from imagesearch import tracing
from imagesearch.defaults import AUTH_TOKEN_ENV  # noqa: F401 (re-exported for the CLI)
from imagesearch.defaults import MAX_MESSAGE_BYTES as DEFAULT_MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retry policy (gRPC caps max_attempts at 5) for UNAVAILABLE only: what
    a server answers while it loads and while it drains on SIGTERM
    (imagesearch/serving/drain.py), and what gRPC reports for a server it cannot
    reach. CANCELLED is not retried: it may be a call the server ran and then
    cut at the end of its grace period (a Delete or DropCollection may have
    happened), or one the client itself cancelled. gRPC retries only what the
    server answered before any response message."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def to_service_config(self) -> dict:
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff_s:g}s",
            "maxBackoff": f"{self.max_backoff_s:g}s",
            "backoffMultiplier": self.multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }


@dataclasses.dataclass(frozen=True)
class Security:
    """Client-side TLS and token settings. TLS is on when `tls` is true or a CA
    file or client certificate is given; `ca` None means the system roots."""

    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None
    auth_token: str | None = None

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls or self.ca or self.cert)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.uses_tls:
            return None
        if bool(self.cert) != bool(self.key):
            raise UsageError("--tls-cert and --tls-key go together: give both (mutual TLS) or neither")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "--tls-ca"),
            private_key=_read(self.key, "--tls-key"),
            certificate_chain=_read(self.cert, "--tls-cert"),
        )


def _read(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {flag} file {path}: {exc.strerror}") from None


def resolve_target(addresses: str) -> str:
    """A gRPC target for one address or a comma-separated list of replicas.

    `host:port` stays as is (gRPC's dns resolver). Several `IP:port` entries
    become `ipv4:IP1:P1,IP2:P2` (or `ipv6:[..]:P,...`), which round_robin
    spreads calls over. A target that already names a scheme passes through."""
    text = (addresses or "").strip()
    if not text:
        raise UsageError("empty service address: give HOST:PORT (or several IP:PORT separated by commas)")
    if text.startswith(_SCHEMES):
        return text
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) == 1:
        _split_host_port(parts[0])
        return parts[0]
    families = set()
    normalised = []
    for part in parts:
        host, port = _split_host_port(part)
        if host == "localhost":
            host = "127.0.0.1"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(
                f"{part!r} in {text!r}: several replicas must be given as IP:PORT (e.g. "
                "127.0.0.1:50051,127.0.0.1:50061); for host names use one DNS name that resolves "
                "to every replica (dns:///NAME:PORT)") from None
        families.add(ip.version)
        normalised.append(f"[{host}]:{port}" if ip.version == 6 else f"{host}:{port}")
    if len(families) > 1:
        raise UsageError(f"{text!r} mixes IPv4 and IPv6 addresses; gRPC needs one family per target")
    return ("ipv6:" if families == {6} else "ipv4:") + ",".join(normalised)


def _split_host_port(part: str) -> tuple[str, int]:
    host, sep, port = part.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"bad service address {part!r}: expected HOST:PORT, e.g. 127.0.0.1:50051")
    return host, int(port)


def retryable_methods(service_names: Sequence[str]) -> list[dict]:
    """Service-config names of the methods gRPC may retry: all but the
    bidirectional streams (EmbedStream, SearchStream).

    grpcio (seen with 1.85) leaves a retried bidirectional call hanging, past
    its deadline, when the server dies after the client has half-closed and
    before the first answer (tests/test_faults_streams.py). Such a call fails
    at once with UNAVAILABLE instead; its caller (index, query) reports what
    was not done. A service whose descriptor is not loaded is named whole."""
    names: list[dict] = []
    for service in service_names:
        try:
            descriptor = descriptor_pool.Default().FindServiceByName(service)
        except KeyError:
            names.append({"service": service})
            continue
        names += [{"service": service, "method": m.name} for m in descriptor.methods
                  if not (m.client_streaming and m.server_streaming)]
    return names


def service_config(service_names: Sequence[str], retry: RetryPolicy | None) -> dict:
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}]}
    names = retryable_methods(service_names)
    if retry is not None and retry.max_attempts > 1 and names:
        config["methodConfig"] = [{"name": names, "retryPolicy": retry.to_service_config()}]
    return config


# Server-streaming calls (Search, ListItems...) read on the calling thread instead of handing
# each message over from the channel's thread, which shortens every Search
# (bench/results/ranker.md). gRPC Python's experimental grpc.experimental.ChannelOptions option.
FAST_UNARY_STREAM = [("SingleThreadedUnaryStream", 1)]


def channel_options(service_names: Sequence[str], *, retry: RetryPolicy | None, max_message_bytes: int,
                    server_name: str | None = None) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.service_config", json.dumps(service_config(service_names, retry))),
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Reconnect quickly after a replica restarts.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        *FAST_UNARY_STREAM,
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


class _AuthInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                       grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call's metadata."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


@dataclasses.dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: list
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class ManagedChannel:
    """One channel to a service (or a round_robin set of replicas): the raw
    channel for health and connectivity, and `channel` with the token added."""

    def __init__(self, address: str, service_names: Sequence[str], *, security: Security | None = None,
                 retry: RetryPolicy | None = RetryPolicy(), max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.address = address
        self.target = resolve_target(address)
        self.security = security or Security()
        self.retry = retry
        self.max_message_bytes = max_message_bytes
        options = channel_options(service_names, retry=retry, max_message_bytes=max_message_bytes,
                                  server_name=self.security.server_name)
        credentials = self.security.channel_credentials()
        if credentials is None:
            self.raw = grpc.insecure_channel(self.target, options=options)
        else:
            self.raw = grpc.secure_channel(self.target, credentials, options=options)
        # Tracing (when the OTEL_* environment turns it on) sends each call's trace context along.
        traced = tracing.traced_channel(self.raw)
        self.channel = (grpc.intercept_channel(traced, _AuthInterceptor(self.security.auth_token))
                        if self.security.auth_token else traced)

    def close(self) -> None:
        self.raw.close()

    def wait_ready(self, what: str, *, connect_timeout: float = 5.0, ready_timeout: float = 600.0,
                   hint: str = "") -> None:
        """Block until the server's health says SERVING.

        Nothing listening: give up after `connect_timeout` seconds (with `hint`,
        e.g. how to start it). A server that answers NOT_SERVING is still
        loading: wait up to `ready_timeout` seconds."""
        stub = health_pb2_grpc.HealthStub(self.raw)
        start = time.monotonic()
        answered = False
        announced = False
        last_error = ""
        while True:
            elapsed = time.monotonic() - start
            limit = ready_timeout if answered else connect_timeout
            remaining = limit - elapsed
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=max(0.5, min(3.0, remaining)),
                                   wait_for_ready=False)
                answered = True
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last_error = f"health is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
                if not announced:
                    log.info("the %s at %s is not serving yet (loading?); waiting up to %.0fs",
                             what, self.address, ready_timeout)
                    announced = True
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return  # a server without the health service: nothing more to wait for
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise ServiceUnavailable(
                        f"the {what} at {self.address} refused the health check: "
                        f"{exc.code().name}: {exc.details()}") from None
                last_error = f"{exc.code().name}: {exc.details()}"
            if time.monotonic() - start >= (ready_timeout if answered else connect_timeout):
                if answered:
                    raise ServiceUnavailable(
                        f"the {what} at {self.address} did not become ready in {ready_timeout:.0f}s "
                        f"({last_error}); check its log")
                tls = (" If it is, check the TLS settings: --tls-ca, and --tls-cert/--tls-key when it wants "
                       "client certificates." if self.security.uses_tls else
                       " If it serves TLS, pass --tls-ca." if "closed" in last_error or "handshake" in last_error.lower()
                       else "")
                raise ServiceUnavailable(
                    f"cannot reach the {what} at {self.address} ({last_error}): is it running? {hint}".rstrip() + tls)
            time.sleep(0.2)
