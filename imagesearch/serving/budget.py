"""`ByteBudget`: one cap on the bytes every call of a server holds at once
(the embedder: encoded images read but not yet embedded, across all streams).

A call that would go over the cap waits before it reads more: the client then
meets HTTP/2 flow control. Memory is bounded by the cap, not by how many streams
are open. Waiters are served by `rank` (lowest first; the embedder passes how
many items the caller already has in flight), then first come first served:
a caller with nothing in flight is not queued behind a thousand streams that
each hold a window full. Used on the server's event loop only."""

from __future__ import annotations

import asyncio
import heapq
import itertools


class ByteBudget:
    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be at least 1 byte")
        self.capacity = capacity
        self.used = 0
        self._waiters: list[tuple[int, int, int, asyncio.Future]] = []
        self._seq = itertools.count()

    async def acquire(self, n: int, rank=0, limit: int | None = None) -> int:
        """Wait until `n` bytes fit under `limit` (default: the capacity; bulk
        callers pass less, leaving room for the others); one item larger than
        the whole budget waits for an empty budget. Returns what to `release`."""
        limit = self.capacity if limit is None else min(limit, self.capacity)
        n = max(0, min(n, self.capacity))
        if not self._waiters and (self.used + n <= limit or self.used == 0):
            self.used += n
            return n
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rank, next(self._seq), n, limit, future))
        self._wake()  # a better-ranked caller that fits goes now, ahead of those waiting
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(n)  # granted, but the caller is gone
            else:
                future.cancel()  # its entry is skipped when it reaches the top
                self._wake()
            raise
        return n

    def release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            _, _, n, limit, future = self._waiters[0]
            if future.done():
                heapq.heappop(self._waiters)
                continue
            if self.used + n > limit and self.used > 0:
                return
            heapq.heappop(self._waiters)
            self.used += n
            future.set_result(None)
