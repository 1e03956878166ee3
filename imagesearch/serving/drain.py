"""`DrainGate`: the interceptor that makes a stopping server answer UNAVAILABLE.

A grpc.aio server's own graceful stop (`server.stop(grace)`) cancels the calls
that reach it in the moment it begins (the client sees CANCELLED, which is not
safe to retry in general). So the stop goes in two steps (`RunningServer.stop`):
first the gate closes (health is NOT_SERVING by then): every new call but
health gets UNAVAILABLE at once, which clients retry, on another replica or on
this one restarted, while the calls already running finish; once none is left
(or the grace period is over) the gRPC server itself stops, and the window in
which it can cancel a newly arrived call is that one instant, not the whole
grace period.

Health calls pass (probes must see NOT_SERVING) and are not counted (a Watch
stream never ends by itself)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Sequence

import grpc

from imagesearch.serving.interceptors import OPEN_METHOD_PREFIXES, Wrapping, refusing_handler, wrap_handler

STOPPING_MESSAGE = "the server is shutting down (health NOT_SERVING): retry on another replica or shortly"


class _Counted(Wrapping):
    def __init__(self, gate: "DrainGate"):
        self.gate = gate

    async def run(self, call, context):
        self.gate._enter()
        try:
            return await call()
        finally:
            self.gate._leave()

    def run_sync(self, call, context):
        self.gate._enter()
        try:
            return call()
        finally:
            self.gate._leave()

    def iterate_sync(self, make, context):
        self.gate._enter()
        try:
            yield from make()
        finally:
            self.gate._leave()


class DrainGate(grpc.aio.ServerInterceptor):
    """Counts the calls running; once `close()`d, refuses new ones with UNAVAILABLE."""

    def __init__(self, exempt_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES):
        self.exempt = tuple(exempt_prefixes)
        self.closed = False
        self._lock = threading.Lock()  # plain handlers run on the thread pool
        self._running = 0

    @property
    def running(self) -> int:
        return self._running

    def _enter(self) -> None:
        with self._lock:
            self._running += 1

    def _leave(self) -> None:
        with self._lock:
            self._running -= 1

    def close(self) -> None:
        self.closed = True

    async def wait_idle(self, timeout: float, poll_s: float = 0.02) -> bool:
        """Wait until no counted call runs, for at most `timeout` seconds; True if none does."""
        deadline = time.monotonic() + timeout
        while self._running > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self.exempt):
            return handler
        if self.closed:
            return refusing_handler(handler, grpc.StatusCode.UNAVAILABLE, STOPPING_MESSAGE)
        return wrap_handler(handler, _Counted(self))
