"""OpenTelemetry tracing, off unless the standard environment turns it on.

On when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`; `none`
is off) or `OTEL_EXPORTER_OTLP_ENDPOINT` is set (then `otlp` is the default),
and `OTEL_SDK_DISABLED` is not `true`. `otlp` sends spans over gRPC to the
endpoint (the exporter reads its own `OTEL_EXPORTER_OTLP_*` settings);
`console` writes each finished span as one JSON line to stderr.

`configure(service_name)` sets the process's tracer provider once (the
resource takes `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` over the
default name) and adds trace_id / span_id to log records (the JSON log format
prints them). Servers add `server_interceptors()` (opentelemetry-
instrumentation-grpc's aio server interceptor: the caller's `traceparent`
metadata continues its trace), clients `traced_channel(channel)`. With tracing
off both lists are empty and nothing of OpenTelemetry is imported.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys

import grpc

from imagesearch import extras

log = logging.getLogger(__name__)

_provider = None


def enabled() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _exporter_names() -> list[str]:
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").lower().split(",") if n.strip()]
    return [n for n in names if n != "none"] or ["otlp"]


def _one_line(span) -> str:
    return span.to_json(indent=None) + "\n"


def configure(service_name: str):
    """Set up the tracer provider when tracing is on; returns it, or None when off."""
    global _provider
    if _provider is not None or not enabled():
        return _provider
    extras.exit_if_missing("tracing")  # the base install (a client library user) has no OpenTelemetry
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in _exporter_names():
        if name == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr, formatter=_one_line)))
        elif name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            except ImportError:
                raise SystemExit("error: OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-grpc "
                                 "(pip install it)") from None
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            raise SystemExit(f"error: OTEL_TRACES_EXPORTER={name!r}: this program knows otlp, console and none")
    trace.set_tracer_provider(provider)
    _provider = provider
    _add_trace_ids_to_logs()
    log.info("tracing on: %s as %s", ", ".join(_exporter_names()),
             provider.resource.attributes.get(SERVICE_NAME, service_name))
    return provider


def _add_trace_ids_to_logs() -> None:
    from opentelemetry import trace

    factory = logging.getLogRecordFactory()

    def record_with_trace_ids(*args, **kwargs):
        record = factory(*args, **kwargs)
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return record

    logging.setLogRecordFactory(record_with_trace_ids)


def shutdown() -> None:
    """Flush and stop the exporters (also done at interpreter exit)."""
    if _provider is not None:
        _provider.shutdown()


def server_interceptors() -> list:
    """grpc.aio server interceptors that continue the caller's trace (empty when off):
    the library's aio server interceptor, then an adapter it needs for our servicers."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_provider), _StreamsAsGenerators()]


class _Writer:
    """A servicer context whose `write` hands responses to a queue."""

    def __init__(self, context, queue):
        self._context = context
        self._queue = queue

    async def write(self, message) -> None:
        await self._queue.put(message)

    def __getattr__(self, name):
        return getattr(self._context, name)


def _as_async_generator(fn):
    """A response-streaming coroutine behaviour (it writes with `context.write`)
    as an async generator of its responses, with the same back-pressure (one
    response waits at a time) and the same end (its return, abort or error)."""
    async def behaviour(request, context):
        queue: asyncio.Queue = asyncio.Queue(maxsize=1)
        done = object()

        async def run():
            try:
                await fn(request, _Writer(context, queue))
            finally:
                await queue.put(done)

        task = asyncio.ensure_future(run())
        try:
            while (message := await queue.get()) is not done:
                yield message
            await task  # its exception (an abort, an error), if any
        finally:
            if not task.done():
                task.cancel()
    return behaviour


class _StreamsAsGenerators(grpc.aio.ServerInterceptor):
    """opentelemetry-instrumentation-grpc's aio server interceptor iterates a
    response-streaming behaviour with `async for`; the servicers here are
    coroutines that stream with `context.write`. This adapter, just inside it,
    turns the latter into the former; everything else passes unchanged."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler
        fn = handler.unary_stream or handler.stream_stream
        if not inspect.iscoroutinefunction(fn):
            return handler
        make = grpc.stream_stream_rpc_method_handler if handler.request_streaming else grpc.unary_stream_rpc_method_handler
        return make(_as_async_generator(fn), request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


def traced_channel(channel):
    """`channel` (a synchronous grpc.Channel) with a client span around each call
    and its context sent as `traceparent` metadata; `channel` itself when off."""
    if _provider is None:
        return channel
    from opentelemetry.instrumentation.grpc import client_interceptor
    from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

    return intercept_channel(channel, client_interceptor(tracer_provider=_provider))


def span(name: str):
    """A context manager: a span named `name` around a block (a no-op when off)."""
    from contextlib import nullcontext

    if _provider is None:
        return nullcontext()
    return _provider.get_tracer("imagesearch").start_as_current_span(name)
