"""Server plumbing shared by the embedder and the ranker, written once.

- `add_server_arguments` / `ServerConfig.from_args`: the flags (and env
  defaults) every server takes: address, TLS, token, message limit, grace.
- `build_server`: a grpc.Server with message limits set, the project's
  interceptors (token check, error-to-status mapping), the standard health
  service and server reflection registered.
- `ErrorMappingInterceptor`: the one place that turns `imagesearch.errors`
  into gRPC status codes.
- `serve`: start, log `listening on HOST:PORT`, and on SIGTERM/SIGINT mark
  health NOT_SERVING and stop with a grace period that drains in-flight work.
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import logging
import os
import signal
import threading
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imagesearch import errors

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Paths that need no token: load balancers and probes must see health.
OPEN_METHOD_PREFIXES = (f"/{HEALTH_SERVICE}/",)
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
AUTH_TOKEN_ENV = "IMAGESEARCH_AUTH_TOKEN"


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status for a domain error (INTERNAL for anything else)."""
    name = getattr(exc, "status", "INTERNAL") if isinstance(exc, errors.ImageSearchError) else "INTERNAL"
    return getattr(grpc.StatusCode, name)


def item_error_fields(exc: BaseException) -> tuple[int, str]:
    """(numeric code, message) for a per-item error inside a stream."""
    return status_code(exc).value[0], str(exc) or type(exc).__name__


# ---------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token: str | None = None
    grace_s: float = 10.0
    max_workers: int = 16
    # Calls in progress or waiting for a handler thread; past it new calls get
    # RESOURCE_EXHAUSTED at once instead of queueing without bound. 0 = no cap.
    max_concurrent_rpcs: int = 1024

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, max_message_bytes: int | None = None) -> "ServerConfig":
        token = args.auth_token
        if args.auth_token_file:
            token = read_token_file(args.auth_token_file)
        if bool(args.tls_cert) != bool(args.tls_key):
            raise SystemExit("error: --tls-cert and --tls-key go together: give both or neither")
        if args.max_concurrent_rpcs < 0:
            raise SystemExit("error: --max-concurrent-rpcs must be 0 (no cap) or more")
        if args.tls_client_ca and not args.tls_cert:
            raise SystemExit("error: --tls-client-ca needs --tls-cert and --tls-key (mutual TLS runs over TLS)")
        return cls(
            host=args.host,
            port=args.port,
            max_message_bytes=max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            auth_token=token or None,
            grace_s=args.grace,
            max_workers=args.max_workers,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
        )


def read_token_file(path: str | os.PathLike) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise SystemExit(f"error: cannot read the token file {path}: {exc.strerror}") from None
    if not token:
        raise SystemExit(f"error: the token file {path} is empty")
    return token


def env_default(name: str, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return type(default)(value) if default is not None and not isinstance(default, str) else value


def add_server_arguments(parser: argparse.ArgumentParser, *, env_prefix: str, default_port: int) -> None:
    """Flags common to both servers; each has an environment default."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=env_default(f"{env_prefix}_HOST", "127.0.0.1"),
                   help=f"address to bind (env {env_prefix}_HOST; default %(default)s; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=env_default(f"{env_prefix}_PORT", default_port),
                   help=f"port to bind, 0 picks a free one (env {env_prefix}_PORT; default %(default)s)")
    g.add_argument("--grace", type=float, default=10.0,
                   help="seconds to drain in-flight calls on SIGTERM (default %(default)s)")
    g.add_argument("--max-workers", type=int, default=16, help="gRPC handler threads (default %(default)s)")
    g.add_argument("--max-concurrent-rpcs", type=int,
                   default=env_default(f"{env_prefix}_MAX_CONCURRENT_RPCS", ServerConfig.max_concurrent_rpcs),
                   help="calls running or queued for a thread; more get RESOURCE_EXHAUSTED at once, 0 = no cap "
                        f"(env {env_prefix}_MAX_CONCURRENT_RPCS; default %(default)s)")
    s = parser.add_argument_group("security")
    s.add_argument("--tls-cert", type=Path, default=env_default(f"{env_prefix}_TLS_CERT", None),
                   help="PEM certificate chain: serve TLS")
    s.add_argument("--tls-key", type=Path, default=env_default(f"{env_prefix}_TLS_KEY", None),
                   help="PEM private key for --tls-cert")
    s.add_argument("--tls-client-ca", type=Path, default=env_default(f"{env_prefix}_TLS_CLIENT_CA", None),
                   help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    s.add_argument("--auth-token", default=env_default(AUTH_TOKEN_ENV, None),
                   help=f"require 'authorization: Bearer TOKEN' on every RPC but health (env {AUTH_TOKEN_ENV})")
    s.add_argument("--auth-token-file", type=Path, default=None, help="read the token from this file")


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default=os.environ.get("IMAGESEARCH_LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(env IMAGESEARCH_LOG_LEVEL)")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ---------------------------------------------------------------- interceptors


def _same_shape_handler(handler: grpc.RpcMethodHandler, behaviour_for: Callable[[Callable, bool], Callable]):
    """A handler of the same cardinality as `handler` whose behaviour is
    `behaviour_for(original, response_streaming)`."""
    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(behaviour_for(handler.unary_unary, False), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(behaviour_for(handler.unary_stream, True), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(behaviour_for(handler.stream_unary, False), **kwargs)
    return grpc.stream_stream_rpc_method_handler(behaviour_for(handler.stream_stream, True), **kwargs)


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Turns `imagesearch.errors.ImageSearchError` raised by a servicer into its
    status code and message; servicers need no try/except of their own."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def behaviour_for(fn, streaming):
            if streaming:
                def stream_behaviour(request, context):
                    try:
                        yield from fn(request, context)
                    except errors.ImageSearchError as exc:
                        _abort(context, method, exc)
                return stream_behaviour

            def unary_behaviour(request, context):
                try:
                    return fn(request, context)
                except errors.ImageSearchError as exc:
                    _abort(context, method, exc)
            return unary_behaviour

        return _same_shape_handler(handler, behaviour_for)


def _abort(context: grpc.ServicerContext, method: str, exc: errors.ImageSearchError):
    code = status_code(exc)
    log.info("%s -> %s: %s", method, code.name, exc)
    context.abort(code, str(exc))


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC except health.

    The comparison is constant-time; the token never reaches the log."""

    def __init__(self, token: str, open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES):
        if not token:
            raise ValueError("empty auth token")
        self._expected = f"Bearer {token}".encode()
        self._open = tuple(open_prefixes)

    def _authorized(self, metadata) -> bool:
        presented = b""
        for key, value in metadata or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
                break
        return hmac.compare_digest(presented, self._expected)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self._open) or self._authorized(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        has_header = any(k == "authorization" for k, _ in handler_call_details.invocation_metadata or ())
        reason = "wrong token" if has_header else "missing 'authorization: Bearer <token>' metadata"
        log.warning("refused %s: %s", method, reason)

        def behaviour_for(_fn, streaming):
            def deny(_request, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              f"{reason}: this server requires a token (--auth-token / {AUTH_TOKEN_ENV})")
            if streaming:
                def deny_stream(request, context):
                    deny(request, context)
                    yield  # pragma: no cover - abort raises
                return deny_stream
            return deny

        return _same_shape_handler(handler, behaviour_for)


# ---------------------------------------------------------------- server


@dataclasses.dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    port: int
    config: ServerConfig
    service_names: tuple[str, ...]

    def set_serving(self, serving: bool = True) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> threading.Event:
        """Health NOT_SERVING first (so balancers stop sending), then drain."""
        self.health.enter_graceful_shutdown()
        return self.server.stop(self.config.grace_s if grace is None else grace)


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"error: cannot read {path}: {exc.strerror}") from None


def build_server(
    config: ServerConfig,
    register: Callable[[grpc.Server], None],
    service_names: Iterable[str],
    extra_interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> RunningServer:
    """A started server with health (NOT_SERVING until `set_serving()`), reflection,
    message limits, the token check and the error mapping. `register(server)` adds
    the project's servicers; `service_names` are their full names."""
    service_names = tuple(service_names)
    interceptors: list[grpc.ServerInterceptor] = []
    if config.auth_token:
        interceptors.append(TokenAuthInterceptor(config.auth_token))
    interceptors.extend(extra_interceptors)
    interceptors.append(ErrorMappingInterceptor())
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=options,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs or None,
    )
    register(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*service_names, HEALTH_SERVICE, reflection.SERVICE_NAME), server)

    address = f"{config.host}:{config.port}"
    if config.tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(_read(config.tls_key), _read(config.tls_cert))],
            root_certificates=_read(config.tls_client_ca),
            require_client_auth=config.tls_client_ca is not None,
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if not port:
        raise SystemExit(f"error: cannot bind {address}: is the port in use? pick another with --port")
    running = RunningServer(server, health_servicer, port, config, service_names)
    running.set_serving(False)
    server.start()
    log.info("listening on %s:%d%s", config.host, port, " (TLS)" if config.tls_cert else "")
    return running


def install_signal_handlers(running: RunningServer, on_stop: Callable[[], None] | None = None) -> threading.Event:
    """SIGTERM/SIGINT: health NOT_SERVING, drain for the grace period, then
    `on_stop()`. Returns an event set once the server has stopped."""
    stopped = threading.Event()

    def handle(signum, _frame):
        if stopped.is_set() or getattr(handle, "fired", False):
            return
        handle.fired = True
        log.info("received %s: draining for up to %.1fs", signal.Signals(signum).name, running.config.grace_s)

        def drain():
            running.stop().wait()
            if on_stop is not None:
                on_stop()
            log.info("stopped")
            stopped.set()

        threading.Thread(target=drain, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stopped


def serve_until_signalled(running: RunningServer, on_stop: Callable[[], None] | None = None) -> None:
    """Block until SIGTERM/SIGINT has drained the server."""
    stopped = install_signal_handlers(running, on_stop)
    while not stopped.wait(0.5):
        pass
