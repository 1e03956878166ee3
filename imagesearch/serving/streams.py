"""The one request-stream reader both servicers use (asyncio).

`StreamReader` reads a call's request stream on its own task into a bounded
queue: the servicer takes requests one at a time (`next`) or as a batch of
what has already arrived (`batch`), while it writes answers. The bound is the
backpressure: a client that sends faster than the server answers meets HTTP/2
flow control, not unbounded memory. A request that is not valid protobuf (an
`InvalidArgument` from the error-mapping interceptor) or a broken stream ends
the reading; `failure` holds the domain error to end the call with once the
requests already read are answered."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Generic, TypeVar

from imagesearch import errors

log = logging.getLogger(__name__)

T = TypeVar("T")
_END = object()


class StreamReader(Generic[T]):
    """`ahead` requests are read ahead on a task; with `ahead=0` none: `next`
    reads the stream itself (the caller decides when the next message comes in)."""

    def __init__(self, requests: AsyncIterator[T], *, ahead: int):
        if ahead < 0:
            raise ValueError("ahead must be 0 or more")
        self._requests = requests.__aiter__()
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=max(1, ahead))
        self.failure: errors.ImageSearchError | None = None
        self.broken = False  # the client cancelled or the connection broke: nobody will read an answer
        self._ended = False
        self._task = asyncio.get_running_loop().create_task(self._pump()) if ahead else None

    async def _read(self):
        """The next request from the stream itself, or _END (noting why it ended)."""
        try:
            return await self._requests.__anext__()
        except StopAsyncIteration:
            return _END
        except errors.ImageSearchError as exc:
            self.failure = exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client cancelled or the connection broke
            self.broken = True
            log.debug("request stream broke: %s: %s", type(exc).__name__, exc)
        return _END

    async def _pump(self) -> None:
        while (request := await self._read()) is not _END:
            await self._queue.put(request)
        await self._queue.put(_END)

    async def next(self) -> T | None:
        """The next request, or None at the end of the stream."""
        if self._ended:
            return None
        item = await (self._queue.get() if self._task is not None else self._read())
        if item is _END:
            self._ended = True
            return None
        return item

    async def batch(self, max_items: int) -> list[T]:
        """At least one request (waiting for it) plus those already read, up to
        `max_items`; an empty list at the end of the stream."""
        first = await self.next()
        if first is None:
            return []
        batch = [first]
        while len(batch) < max_items and not self._ended:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if item is _END:
                self._ended = True
                break
            batch.append(item)
        return batch

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def __aenter__(self) -> "StreamReader[T]":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()
