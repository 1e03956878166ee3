"""What every service client shares: the managed channel, deadlines,
readiness and error translation."""

from __future__ import annotations

from typing import Callable

import grpc

from clients.channels import DEFAULT_MAX_MESSAGE_BYTES, ManagedChannel, RetryPolicy, Security
from clients.errors import ClientError, from_rpc_error


# Per-item allowance added to a stream's deadline (a slow CPU model, queued behind other streams).
PER_ITEM_S = 2.0


class ServiceClient:
    """A stub over a ManagedChannel. Subclasses set `what` (the service's name
    in messages), `hint` (how to start it), `service` (its full proto name),
    `stub_class` and `default_address` (used when `address` is None)."""

    what: str
    hint: str
    service: str
    stub_class: Callable
    default_address: str

    def __init__(self, address: str | None = None, *, security: Security | None = None, timeout: float = 30.0,
                 retry: RetryPolicy | None = RetryPolicy(), max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 per_item_s: float = PER_ITEM_S):
        self.address = self.default_address if address is None else address
        self.security = security or Security()
        self.timeout = timeout
        self.retry = retry
        self.per_item_s = per_item_s
        self._open(max_message_bytes)

    def _open(self, max_message_bytes: int) -> None:
        self._channel = ManagedChannel(self.address, [self.service], security=self.security, retry=self.retry,
                                       max_message_bytes=max_message_bytes)
        self.stub = self.stub_class(self._channel.channel)

    @property
    def max_message_bytes(self) -> int:
        return self._channel.max_message_bytes

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _error(self, exc: grpc.RpcError, hint: str = "") -> ClientError:
        return from_rpc_error(exc, self.what, self.address, hint=hint, unavailable_hint=self.hint)

    def wait_ready(self, *, connect_timeout: float = 5.0, ready_timeout: float = 600.0):
        self._channel.wait_ready(self.what, connect_timeout=connect_timeout, ready_timeout=ready_timeout,
                                 hint=self.hint)
        return self

    def stream_deadline(self, n_items: int) -> float:
        """A stream's deadline: the call timeout plus an allowance per item."""
        return self.timeout + self.per_item_s * n_items


