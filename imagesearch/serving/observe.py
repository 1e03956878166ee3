"""One interceptor that watches every call: the per-RPC Prometheus metrics
(when the server has them) and the access log.

Outermost of the server's interceptors, so it sees every call as the client
does, refused ones included (UNAUTHENTICATED, RESOURCE_EXHAUSTED). Each
finished call is one record of the `imagesearch.access` logger with the
fields `method`, `code`, `peer` and `duration` (seconds), which
`--log-format json` writes as keys: at DEBUG for OK and health calls, at INFO
otherwise (so the default level logs every failed call, `--log-level DEBUG`
every call).
"""

from __future__ import annotations

import logging
import time

import grpc

from imagesearch.serving.interceptors import HEALTH_SERVICE, Wrapping, wrap_handler
from imagesearch.serving.metrics import ServiceMetrics, status_of

access_log = logging.getLogger("imagesearch.access")


class _Observe(Wrapping):
    def __init__(self, metrics: ServiceMetrics | None, method: str):
        self.metrics = metrics
        self.method = method
        self.quiet = method.startswith(f"/{HEALTH_SERVICE}/")

    def _start(self) -> float:
        if self.metrics is not None:
            self.metrics.in_flight.labels(self.method).inc()
        return time.perf_counter()

    def _finish(self, started: float, context, exc: BaseException | None) -> None:
        seconds = time.perf_counter() - started
        code = status_of(context, exc)
        if self.metrics is not None:
            self.metrics.in_flight.labels(self.method).dec()
            self.metrics.requests.labels(self.method, code.name).inc()
            self.metrics.latency.labels(self.method).observe(seconds)
        level = logging.DEBUG if code == grpc.StatusCode.OK or self.quiet else logging.INFO
        if access_log.isEnabledFor(level):
            peer = context.peer() if hasattr(context, "peer") else ""
            access_log.log(level, "%s %s %.1f ms %s", self.method, code.name, seconds * 1e3, peer,
                           extra={"method": self.method, "code": code.name, "peer": peer,
                                  "duration": round(seconds, 6)})

    async def run(self, call, context):
        started = self._start()
        try:
            result = await call()
        except BaseException as exc:
            self._finish(started, context, exc)
            raise
        self._finish(started, context, None)
        return result

    def run_sync(self, call, context):
        started = self._start()
        try:
            result = call()
        except BaseException as exc:
            self._finish(started, context, exc)
            raise
        self._finish(started, context, None)
        return result

    def iterate_sync(self, make, context):
        started = self._start()
        try:
            yield from make()
        except BaseException as exc:
            self._finish(started, context, exc)
            raise
        self._finish(started, context, None)


class ObserveInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: ServiceMetrics | None = None):
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return wrap_handler(handler, _Observe(self.metrics, handler_call_details.method))


class Observability:
    """What a server's main() sets up for operators, from its flags and the
    environment: tracing (when OTEL_* turn it on), Prometheus metrics (when
    --metrics-port is given) and the access log. `interceptors` go first in
    the server's list; `start(host)` opens the metrics endpoint."""

    def __init__(self, service: str, metrics_port: int | None):
        from imagesearch import tracing

        tracing.configure(f"imagesearch-{service}")
        self.metrics_port = metrics_port
        self.metrics = ServiceMetrics(service) if metrics_port is not None else None
        self.interceptors = [*tracing.server_interceptors(), ObserveInterceptor(self.metrics)]

    def start(self, host: str) -> None:
        if self.metrics is not None:
            self.metrics.serve(host, self.metrics_port)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
