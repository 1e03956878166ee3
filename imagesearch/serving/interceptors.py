"""Server interceptors: the bearer-token check and the one place that maps
`imagesearch.errors` to gRPC status codes."""

from __future__ import annotations

import hmac
import logging
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2

from imagesearch import errors
from imagesearch.defaults import AUTH_TOKEN_ENV

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Paths that need no token: load balancers and probes must see health.
OPEN_METHOD_PREFIXES = (f"/{HEALTH_SERVICE}/",)


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status for a domain error (INTERNAL for anything else)."""
    name = getattr(exc, "status", "INTERNAL") if isinstance(exc, errors.ImageSearchError) else "INTERNAL"
    return getattr(grpc.StatusCode, name)


def item_error_fields(exc: BaseException) -> tuple[int, str]:
    """(numeric code, message) for a per-item error inside a stream."""
    return status_code(exc).value[0], str(exc) or type(exc).__name__




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
