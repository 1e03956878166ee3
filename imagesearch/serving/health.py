"""The standard grpc.health.v1 service (aio), with a cap on Watch streams.

A Watch stream is long-lived by design and needs no token (probes must see
health), so without a cap anyone could open them by the thousand; past the cap
a Watch gets RESOURCE_EXHAUSTED at once. Check is never capped."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1.health import aio as health_aio

log = logging.getLogger(__name__)


class HealthServicer(health_aio.HealthServicer):
    def __init__(self, max_watches: int = 0):
        super().__init__()
        self.max_watches = max_watches
        self.watches = 0

    async def Watch(self, request, context) -> None:
        if self.max_watches and self.watches >= self.max_watches:
            log.info("refused a health Watch from %s: %d open (--max-health-watches)", context.peer(), self.watches)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.watches} health Watch streams are open, the server's cap "
                                "(--max-health-watches): use Check, or retry later")
        self.watches += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watches -= 1
