"""Server lifecycle on grpc.aio: `build_server` (options and bounds,
interceptors, health, reflection, TLS, bind) and the SIGTERM/SIGINT drain.

The server runs on an asyncio event loop in its own thread ("grpc-loop"): an
open call costs no thread, only a little memory. Blocking work (searches,
database writes, synchronous handlers) goes to the loop's default executor,
a thread pool of `--max-workers` threads. The main thread stays free to load
a model or a database after the port is bound (health answers NOT_SERVING,
RPCs UNAVAILABLE meanwhile), then waits for a signal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imagesearch import defaults
from imagesearch.serving.config import ServerConfig, StartupError
from imagesearch.serving.drain import DrainGate
from imagesearch.serving.health import HealthServicer
from imagesearch.serving.interceptors import HEALTH_SERVICE, build_interceptors

log = logging.getLogger(__name__)


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel arguments that bound what one client can make the server hold."""
    ms = lambda s: int(s * 1000)  # noqa: E731
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
        # BDP probing grows a stream's receive window toward the link's bandwidth-delay
        # product: 100 streams that stop reading then hold hundreds of MB each.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.keepalive_time_ms", ms(defaults.KEEPALIVE_TIME_S)),
        ("grpc.keepalive_timeout_ms", ms(defaults.KEEPALIVE_TIMEOUT_S)),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", ms(defaults.MIN_CLIENT_PING_INTERVAL_S)),
        ("grpc.http2.max_ping_strikes", defaults.MAX_PING_STRIKES),
        ("grpc.keepalive_permit_without_calls", 0),
    ]
    if config.max_streams_per_connection:
        options.append(("grpc.max_concurrent_streams", config.max_streams_per_connection))
    if config.max_connection_idle_s:
        options.append(("grpc.max_connection_idle_ms", ms(config.max_connection_idle_s)))
    if config.max_connection_age_s:
        options.append(("grpc.max_connection_age_ms", ms(config.max_connection_age_s)))
        options.append(("grpc.max_connection_age_grace_ms", ms(config.max_connection_age_grace_s)))
    return options


class RunningServer:
    """A started grpc.aio server and its event-loop thread. Methods are called
    from other threads (the main thread, tests); `run(coro)` runs a coroutine on
    the server's loop and returns its result."""

    def __init__(self, config: ServerConfig, service_names: tuple[str, ...]):
        self.config = config
        self.service_names = service_names
        self.port = 0
        self.server: grpc.aio.Server | None = None
        self.health: HealthServicer | None = None
        self.gate = DrainGate()
        self.loop = asyncio.new_event_loop()
        workers = config.max_workers or os.cpu_count() or 1
        self.executor = futures.ThreadPoolExecutor(workers, thread_name_prefix="work")
        self.loop.set_default_executor(self.executor)
        self._stopped = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run_loop, name="grpc-loop", daemon=True)
        self._thread.start()

    def _run_loop(self) -> None:
        try:
            self.loop.run_forever()
        finally:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self._stopped.set()

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def set_serving(self, serving: bool = True) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)

        async def set_all():
            for name in ("", *self.service_names):
                await self.health.set(name, status)
        self.run(set_all())

    def enter_graceful_shutdown(self) -> None:
        """Health NOT_SERVING for good (balancers stop sending); calls still run."""
        self.run(self.health.enter_graceful_shutdown())

    def stop(self, grace: float | None = None) -> threading.Event:
        """Health NOT_SERVING first and new calls refused with UNAVAILABLE
        (`DrainGate`); the calls in flight get up to `grace` seconds (the
        config's by default) to finish; then the gRPC server stops (what still
        runs is cancelled) and the loop with it. Returns an event set once
        everything has stopped."""
        if self._stopping:
            return self._stopped
        self._stopping = True
        grace = self.config.grace_s if grace is None else grace

        async def drain():
            try:
                started = time.monotonic()
                if self.health is not None:
                    await self.health.enter_graceful_shutdown()
                self.gate.close()
                if self.server is not None:
                    # Clients answered UNAVAILABLE back off before they retry: refusing a moment
                    # even when nothing runs leaves fewer calls in transit when gRPC stops.
                    await asyncio.sleep(min(grace, defaults.DRAIN_SETTLE_S))
                    if grace > 0 and not await self.gate.wait_idle(grace - (time.monotonic() - started)):
                        log.info("drain: %d calls still running after %.1f s: cancelling them",
                                 self.gate.running, grace)
                    await self.server.stop(max(0.0, grace - (time.monotonic() - started)))
            finally:
                self.loop.call_soon(self.loop.stop)

        asyncio.run_coroutine_threadsafe(drain(), self.loop)
        return self._stopped


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read the {what} {path}: {exc.strerror}") from None


def _credentials(config: ServerConfig) -> grpc.ServerCredentials:
    key, cert = _read(config.tls_key, "TLS key"), _read(config.tls_cert, "TLS certificate")
    ca = _read(config.tls_client_ca, "client CA bundle")
    for data, path, marker in [(cert, config.tls_cert, b"-----BEGIN CERTIFICATE"),
                               (key, config.tls_key, b"PRIVATE KEY-----"),
                               (ca, config.tls_client_ca, b"-----BEGIN CERTIFICATE")]:
        if data is not None and marker not in data:
            raise StartupError(f"{path} is not a PEM file ({marker.decode().strip('-')} not found)")
    try:
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=config.tls_client_ca is not None)
    except Exception as exc:  # grpc's message is a Python-level one; give it one line
        raise StartupError(f"the TLS certificate or key cannot be used: {exc}") from None


async def _start(running: RunningServer, register: Callable[[grpc.aio.Server], None],
                 interceptors: Sequence[grpc.aio.ServerInterceptor]) -> None:
    config = running.config
    server = grpc.aio.server(
        migration_thread_pool=running.executor,
        interceptors=list(interceptors),
        options=server_options(config),
        maximum_concurrent_rpcs=config.max_concurrent_rpcs or None,
    )
    register(server)
    health_servicer = HealthServicer(max_watches=config.max_health_watches)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*running.service_names, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    for name in ("", *running.service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{config.host}:{config.port}"
    try:
        if config.tls_cert:
            port = server.add_secure_port(address, _credentials(config))
        else:
            port = server.add_insecure_port(address)
    except StartupError:
        raise
    except Exception as exc:
        raise StartupError(f"cannot bind {address}: {_first_line(exc)}: is the port in use? pick another "
                           "with --port") from None
    if not port:
        raise StartupError(f"cannot bind {address}: is the port in use? pick another with --port")
    try:
        await server.start()
    except Exception as exc:
        raise StartupError(f"cannot start serving on {address}: {_first_line(exc)}") from None
    running.server, running.health, running.port = server, health_servicer, port


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def build_server(
    config: ServerConfig,
    register: Callable[[grpc.aio.Server], None],
    service_names: Iterable[str],
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> RunningServer:
    """A started server with health (NOT_SERVING until `set_serving()`), reflection,
    message limits and abuse bounds, the token check and the error mapping.
    `register(server)` adds the project's servicers; `service_names` are their
    full names. Raises StartupError (one line, exit 2) when it cannot bind."""
    running = RunningServer(config, tuple(service_names))

    async def start():
        try:
            await _start(running, register, build_interceptors(config, [*extra_interceptors, running.gate]))
        except StartupError as exc:  # a SystemExit: raised inside the loop it would stop the loop itself
            return exc
        return None

    try:
        failure = running.run(start())
    except BaseException:
        running.stop(0).wait(10)
        raise
    if failure is not None:
        running.stop(0).wait(10)
        raise failure
    log.info("listening on %s:%d (TLS: %s; auth token: %s)", config.host, running.port, config.tls,
             "required" if config.auth_token else "off")
    return running


def install_signal_handlers(running: RunningServer, on_stop: Callable[[], None] | None = None,
                            on_drain: Callable[[], None] | None = None) -> threading.Event:
    """SIGTERM/SIGINT: health NOT_SERVING, drain for the grace period, then
    `on_stop()`. `on_drain()` runs as the drain begins (e.g. to end calls
    waiting for background work that will never finish). Returns an event
    set once the server has stopped."""
    stopped = threading.Event()

    def handle(signum, _frame):
        if stopped.is_set() or getattr(handle, "fired", False):
            return
        handle.fired = True
        log.info("received %s: draining for up to %.1fs", signal.Signals(signum).name, running.config.grace_s)

        def drain():
            stopped_event = running.stop()
            if on_drain is not None:
                on_drain()
            stopped_event.wait()
            if on_stop is not None:
                on_stop()
            log.info("stopped")
            stopped.set()

        threading.Thread(target=drain, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stopped


def serve_until_signalled(running: RunningServer, on_stop: Callable[[], None] | None = None,
                          on_drain: Callable[[], None] | None = None) -> None:
    """Block until SIGTERM/SIGINT has drained the server."""
    stopped = install_signal_handlers(running, on_stop, on_drain)
    while not stopped.wait(0.5):
        pass
