"""Client-side errors: what went wrong, what to do about it, and the exit code.

Exit codes: 0 ok, 1 runtime failure (a service down or failing), 2 usage or
input error (bad flags, bad files, a wrong token, an unknown collection)."""

from __future__ import annotations

import grpc

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2

SERVE_HINT = "start it with `imagesearch serve --db gallery.db` (or point {flag} / {env} at a running one)"

# Status codes that mean the caller has to change something (the input, a flag,
# the token), not just retry: a call failing with one is a UsageError (exit 2),
# and an item failing with one is a bad input, not a service's trouble.
INPUT_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.OUT_OF_RANGE,
})


class ClientError(Exception):
    """An error for a person: the message says what to do. `exit_code` is
    what the CLI exits with."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class UsageError(ClientError):
    exit_code = EXIT_USAGE


class ServiceUnavailable(ClientError):
    exit_code = EXIT_RUNTIME


def from_rpc_error(exc: grpc.RpcError, what: str, address: str, *, hint: str = "",
                   unavailable_hint: str = "") -> ClientError:
    """A ClientError naming the service, its address and the way out: `hint`
    for an answer the caller can act on, `unavailable_hint` (how to start the
    service) for UNAVAILABLE."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServiceUnavailable(
            f"the {what} at {address} is unavailable ({details}): is it running? {unavailable_hint}".rstrip(),
            code=code)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ClientError(f"the {what} at {address} did not answer in time ({details}); "
                           "raise --timeout, or check that it is not overloaded", code=code)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        advice = "" if "--auth-token" in details else " (pass --auth-token or set IMAGESEARCH_AUTH_TOKEN)"
        return UsageError(f"the {what} at {address} refused the call: {details}{advice}", code=code)
    message = f"the {what} at {address} answered {code.name}: {details}"
    if hint:
        message += f" ({hint})"
    cls = UsageError if code in INPUT_CODES else ClientError
    return cls(message, code=code)
