"""Server lifecycle: `build_server` (message limits, interceptors, health,
reflection, TLS, bind) and the SIGTERM/SIGINT drain."""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imagesearch.serving.config import ServerConfig
from imagesearch.serving.interceptors import HEALTH_SERVICE, ErrorMappingInterceptor, TokenAuthInterceptor

log = logging.getLogger(__name__)



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
