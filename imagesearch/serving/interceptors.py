"""Server interceptors (grpc.aio): the bearer-token check, the stream idle
timeout, and the one place that maps `imagesearch.errors` to gRPC status codes
(including a request that is not valid protobuf: INVALID_ARGUMENT).

Each interceptor returns a handler of the same shape as the one it wraps, for
every kind of behaviour gRPC accepts: coroutine functions (the product's
servicers, which stream with `context.write`), async generators (grpc's own
reflection), and plain functions or generators (run on the server's thread
pool; tests' fakes). `build_interceptors` lists them in order, in one place."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from typing import Callable, Sequence

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from imagesearch import errors
from imagesearch.defaults import AUTH_TOKEN_ENV
from imagesearch.errors import shorten

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
HEALTH_WATCH = f"/{HEALTH_SERVICE}/Watch"
# Paths that need no token: load balancers and probes must see health.
OPEN_METHOD_PREFIXES = (f"/{HEALTH_SERVICE}/",)


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status for a domain error (INTERNAL for anything else)."""
    name = getattr(exc, "status", "INTERNAL") if isinstance(exc, errors.ImageSearchError) else "INTERNAL"
    return getattr(grpc.StatusCode, name)


# ---------------------------------------------------------------- handler plumbing

def _kind(fn) -> str:
    if inspect.isasyncgenfunction(fn):
        return "asyncgen"
    if inspect.iscoroutinefunction(fn):
        return "coroutine"
    if inspect.isgeneratorfunction(fn):
        return "generator"
    return "function"


class Wrapping:
    """What an interceptor does around one call; subclasses override the hooks.

    `requests(it, context)` wraps a request iterator, `run(call, context)` runs
    a coroutine-style behaviour (`call()` returns its awaitable), and
    `run_sync(call, context)` a plain one and `iterate_sync(make, context)` a
    plain generator (both on the thread pool)."""

    def requests(self, iterator, context):
        return iterator

    async def run(self, call, context):
        return await call()

    def run_sync(self, call, context):
        return call()

    def iterate_sync(self, make, context):
        yield from make()


def wrap_handler(handler: grpc.RpcMethodHandler, wrapping: Wrapping,
                 deserializer: Callable | None = None) -> grpc.RpcMethodHandler:
    """A handler of the same cardinality as `handler` whose behaviour runs
    inside `wrapping`'s hooks."""
    kwargs = dict(request_deserializer=deserializer or handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    streaming_request = handler.request_streaming
    fn = (handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream)
    kind = _kind(fn)

    def arg(request, context):
        return wrapping.requests(request, context) if streaming_request else request

    if kind == "coroutine":
        async def behaviour(request, context):
            return await wrapping.run(lambda: fn(arg(request, context), context), context)
    elif kind == "asyncgen":
        async def behaviour(request, context):
            agen = fn(arg(request, context), context)

            async def drain():
                async for response in agen:
                    await context.write(response)
            await wrapping.run(drain, context)
    elif kind == "generator":
        def behaviour(request, context):
            yield from wrapping.iterate_sync(lambda: fn(arg(request, context), context), context)
    else:
        def behaviour(request, context):
            return wrapping.run_sync(lambda: fn(arg(request, context), context), context)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behaviour, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behaviour, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behaviour, **kwargs)
    return grpc.unary_unary_rpc_method_handler(behaviour, **kwargs)


# ---------------------------------------------------------------- errors -> status codes

class Malformed:
    """What the deserializer hands on for bytes that are not the request message."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except (DecodeError, ValueError, TypeError) as exc:
            return Malformed(f"the request is not a valid protobuf message of this method's type ({exc})")
    return deserialize


def _check(request):
    if isinstance(request, Malformed):
        raise errors.InvalidArgument(request.reason)
    return request


class _MapErrors(Wrapping):
    def __init__(self, method: str):
        self.method = method

    def requests(self, iterator, context):
        if hasattr(iterator, "__aiter__"):
            async def checked():
                async for request in iterator:
                    yield _check(request)
            return checked()
        return (_check(r) for r in iterator)

    async def run(self, call, context):
        try:
            return await call()
        except errors.ImageSearchError as exc:
            await context.abort(*self._status(exc))

    def run_sync(self, call, context):
        try:
            return call()
        except errors.ImageSearchError as exc:
            context.abort(*self._status(exc))

    def iterate_sync(self, make, context):
        # aio runs a plain generator on a thread while it writes what it yielded:
        # abort() there would race that write; ending with the status set does not.
        try:
            yield from make()
        except errors.ImageSearchError as exc:
            code, details = self._status(exc)
            context.set_code(code)
            context.set_details(details)

    def _status(self, exc: errors.ImageSearchError) -> tuple[grpc.StatusCode, str]:
        code = status_code(exc)
        log.info("%s -> %s: %s", self.method, code.name, shorten(str(exc), 300))
        return code, errors.message_of(exc)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns `imagesearch.errors.ImageSearchError` raised by a servicer into its
    status code and message, and a request that does not parse into
    INVALID_ARGUMENT (logged at INFO: it is the client's fault); servicers need
    no try/except of their own."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return wrap_handler(_check_unary(handler), _MapErrors(handler_call_details.method),
                            _tolerant(handler.request_deserializer))


def _check_unary(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """For a unary request, raise InvalidArgument for a Malformed one before the behaviour runs."""
    if handler.request_streaming:
        return handler
    fn = handler.unary_unary or handler.unary_stream
    kind = _kind(fn)
    if kind == "coroutine":
        async def checked(request, context):
            return await fn(_check(request), context)
    elif kind == "asyncgen":
        async def checked(request, context):
            async for response in fn(_check(request), context):
                yield response
    elif kind == "generator":
        def checked(request, context):
            yield from fn(_check(request), context)
    else:
        def checked(request, context):
            return fn(_check(request), context)
    make = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
    return make(checked, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


# ---------------------------------------------------------------- bearer token

class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC except health.

    The comparison is constant-time; the token never reaches the log."""

    def __init__(self, token: str, open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES):
        if not token or not token.strip():
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

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self._open) or self._authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        has_header = any(k == "authorization" for k, _ in handler_call_details.invocation_metadata or ())
        reason = "wrong token" if has_header else "missing 'authorization: Bearer <token>' metadata"
        log.warning("refused %s: %s", method, reason)
        return refusing_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                                f"{reason}: this server requires a token (--auth-token / {AUTH_TOKEN_ENV})")


def refusing_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s cardinality that answers `code` at once, reading nothing."""

    async def refuse(_request, context):
        await context.abort(code, message)

    kwargs = dict(request_deserializer=None, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)


# ---------------------------------------------------------------- stream idle timeout

class _IdleContext:
    """The call's context, noting every response written."""

    def __init__(self, context, touch):
        self._context = context
        self._touch = touch

    async def write(self, message):
        await self._context.write(message)
        self._touch()

    async def read(self):
        message = await self._context.read()
        self._touch()
        return message

    def __getattr__(self, name):
        return getattr(self._context, name)


class StreamIdleInterceptor(grpc.aio.ServerInterceptor):
    """Ends a streaming call (coroutine or async-generator behaviour) that reads
    no message and writes no response for `timeout_s` seconds, with
    DEADLINE_EXCEEDED. A response blocked because the client stops reading
    counts as nothing written. Health Watch streams are exempt (capped instead)."""

    def __init__(self, timeout_s: float, exempt: Sequence[str] = (HEALTH_WATCH,)):
        self.timeout_s = timeout_s
        self.exempt = tuple(exempt)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if (handler is None or not (handler.request_streaming or handler.response_streaming)
                or handler_call_details.method in self.exempt):
            return handler
        fn = handler.unary_stream or handler.stream_unary or handler.stream_stream
        kind = _kind(fn)
        if kind not in ("coroutine", "asyncgen"):
            return handler
        timeout_s, method = self.timeout_s, handler_call_details.method

        async def behaviour(request, context):
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(timeout_s) as deadline:
                def touch():
                    deadline.reschedule(loop.time() + timeout_s)

                watched = _IdleContext(context, touch)
                if handler.request_streaming:
                    request = _touching(request, touch)
                if kind == "coroutine":
                    return await fn(request, watched)
                async for response in fn(request, watched):
                    await watched.write(response)
                return None

        async def guarded(request, context):
            started = time.monotonic()
            try:
                return await behaviour(request, context)
            except TimeoutError:
                log.info("%s: no message read or written for %.0f s (open %.0f s): ended", method, timeout_s,
                         time.monotonic() - started)
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"the call read no message and wrote no response for {timeout_s:g} s "
                                    "(--stream-idle-timeout): the server ended it")

        kwargs = dict(request_deserializer=handler.request_deserializer,
                      response_serializer=handler.response_serializer)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(guarded, **kwargs)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(guarded, **kwargs)
        return grpc.unary_stream_rpc_method_handler(guarded, **kwargs)


async def _touching(iterator, touch):
    async for request in iterator:
        touch()
        yield request


# ---------------------------------------------------------------- per-item errors inside streams

def item_error_fields(exc: BaseException) -> tuple[int, str]:
    """(numeric code, message) for a per-item error inside a stream."""
    return status_code(exc).value[0], errors.message_of(exc)


def item_error(exc: BaseException, method: str, what: str):
    """The `ItemError` a stream answers for one failed item, logged as a failed
    unary call is (INFO for a domain error; ERROR, as INTERNAL, for a bug).
    `what` names the item (a client's id: shortened in the log)."""
    from imagesearch.v1 import common_pb2

    if not isinstance(exc, errors.ImageSearchError):
        log.error("%s %s failed: %s: %s", method, shorten(what), type(exc).__name__, exc)
        exc = errors.ImageSearchError(f"{shorten(what)}: internal error ({type(exc).__name__})")
    code, message = item_error_fields(exc)
    log.info("%s %s -> %s: %s", method, shorten(what), status_code(exc).name, shorten(message, 300))
    return common_pb2.ItemError(code=code, message=message)


def build_interceptors(config, extra: Sequence[grpc.aio.ServerInterceptor] = ()) -> list:
    """The server's interceptors, outermost first: `extra` (traces, metrics and the
    access log: they see every call, refused ones included), the token check,
    the stream idle timeout, and the error mapping closest to the servicer."""
    interceptors: list[grpc.aio.ServerInterceptor] = [*extra]
    if config.auth_token:
        interceptors.append(TokenAuthInterceptor(config.auth_token))
    if config.stream_idle_timeout_s:
        interceptors.append(StreamIdleInterceptor(config.stream_idle_timeout_s))
    interceptors.append(ErrorMappingInterceptor())
    return interceptors
