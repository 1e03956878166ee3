"""`ByteBudget`: one cap on the bytes every call of a server holds at once
(the embedder: encoded images read but not yet embedded, across all streams).

A call that would go over the cap waits, first come first served, before it
reads more: the client then meets HTTP/2 flow control. Memory is bounded by
the cap, not by how many streams are open. Used on the server's event loop only."""

from __future__ import annotations

import asyncio
import collections


class ByteBudget:
    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be at least 1 byte")
        self.capacity = capacity
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    async def acquire(self, n: int) -> int:
        """Wait until `n` bytes fit (one item larger than the whole budget waits
        for an empty budget); returns what to `release` later."""
        n = max(0, min(n, self.capacity))
        if not self._waiters and self.used + n <= self.capacity:
            self.used += n
            return n
        future = asyncio.get_running_loop().create_future()
        entry = (n, future)
        self._waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(n)  # granted, but the caller is gone
            else:
                try:
                    self._waiters.remove(entry)
                except ValueError:
                    pass
                self._wake()
            raise
        return n

    def release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self.used + n > self.capacity:
                return
            self._waiters.popleft()
            self.used += n
            future.set_result(None)
