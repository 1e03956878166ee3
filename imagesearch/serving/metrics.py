"""Prometheus metrics for a server, with prometheus-client's own collectors.

Off unless `--metrics-port` (or `<PREFIX>_METRICS_PORT`) is given; 0 picks a
free port, and the log says `metrics on http://HOST:PORT/metrics`. The HTTP
endpoint binds the server's `--host` and answers `/metrics` alone (404 for any
other path). Each server has its own registry (so
several servers in one test process do not collide) holding the library's
process, platform and GC collectors, the per-RPC metrics every server has,
and what the service adds through `counter` / `gauge` / `histogram`:

    imagesearch_<service>_requests_total{method, code}       finished RPCs by status code
    imagesearch_<service>_request_duration_seconds{method}   RPC latency (histogram)
    imagesearch_<service>_requests_in_flight{method}         RPCs running now

`method` is the full gRPC method (`/imagesearch.v1.RankerService/Search`),
`code` the status name (`OK`, `INVALID_ARGUMENT`, ...): both bounded.
`imagesearch.serving.observe.ObserveInterceptor` fills them in for every call.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

from imagesearch.serving.config import env_default

log = logging.getLogger(__name__)

# Seconds: from a cached search (~100 us) to a big batch on a CPU (tens of seconds).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def add_metrics_arguments(parser: argparse.ArgumentParser, *, env_prefix: str) -> None:
    parser.add_argument("--metrics-port", type=int, default=env_default(f"{env_prefix}_METRICS_PORT", None),
                        help=f"serve Prometheus metrics on this port at /metrics (bound to --host); 0 picks a "
                             f"free one, named in the log; unset = no metrics (env {env_prefix}_METRICS_PORT)")


class ServiceMetrics:
    """One service's registry and its per-RPC metrics."""

    def __init__(self, service: str):
        self.service = service
        self.prefix = f"imagesearch_{service}"
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.requests = self.counter("requests", "RPCs finished, by method and status code", ["method", "code"])
        self.latency = self.histogram("request_duration_seconds", "RPC latency from the call's start to its "
                                      "status, by method", ["method"])
        self.in_flight = self.gauge("requests_in_flight", "RPCs running now, by method", ["method"])
        self.http = None
        self.port: int | None = None

    def counter(self, what: str, documentation: str, labels=()) -> Counter:
        return Counter(f"{self.prefix}_{what}", documentation, list(labels), registry=self.registry)

    def gauge(self, what: str, documentation: str, labels=()) -> Gauge:
        return Gauge(f"{self.prefix}_{what}", documentation, list(labels), registry=self.registry)

    def histogram(self, what: str, documentation: str, labels=(), buckets=LATENCY_BUCKETS) -> Histogram:
        return Histogram(f"{self.prefix}_{what}", documentation, list(labels), buckets=buckets,
                         registry=self.registry)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics endpoint (a daemon thread); returns its port."""
        try:
            self.http = make_server(host, port, _only_metrics(make_wsgi_app(self.registry)),
                                    ThreadingWSGIServer, handler_class=_QuietHandler)
        except OSError as exc:
            raise SystemExit(f"error: cannot serve metrics on {host}:{port}: {exc.strerror or exc}; "
                             "pick another --metrics-port") from None
        threading.Thread(target=self.http.serve_forever, name="metrics-http", daemon=True).start()
        self.port = self.http.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None


def _only_metrics(app):
    """`app` at /metrics; 404 for every other path (a scraper asks for one)."""
    def wsgi(environ, start_response):
        if environ.get("PATH_INFO") == "/metrics":
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: metrics are served at /metrics\n"]

    return wsgi


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # scrapes are not worth a log line each
        pass


def status_of(context, exc: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with: the code the handler set or aborted with,
    CANCELLED for a cancelled call, UNKNOWN for an unexpected exception, else OK."""
    try:
        code = context.code()
    except (AttributeError, NotImplementedError):
        code = None
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
