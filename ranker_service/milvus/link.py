"""The Milvus backend's connection (`Link`): one pymilvus client, every call
through `call()` with a timeout (the ranker's `--milvus-timeout`, or less where
the gRPC call's deadline is nearer: ranker_service/backend.py's `deadline_of`),
and a watcher thread that follows Milvus's reachability.

The watcher probes Milvus every `PROBE_INTERVAL_S` (a `list_collections`
with a `PROBE_TIMEOUT_S` timeout) and at once when a call fails for want of
Milvus. When Milvus stops answering, `on_change(False)` runs (the ranker turns
health NOT_SERVING) and calls are refused at once with UNAVAILABLE, saying
Milvus at which URI is unreachable; when it answers again, `on_up()` runs
first (the backend loads what a restarted Milvus released), then
`on_change(True)`. Each change is logged once; pymilvus's own per-call error
logs are silenced (they would repeat on every call).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from imagesearch import errors
from ranker_service.backend import call_deadline

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 2.0
MIN_TIMEOUT_S = 0.05
# what a call failing for want of Milvus (not for a refused request) says
_UNREACHABLE = ("fail connecting", "unavailable", "connection refused", "deadline", "timeout", "timed out",
                "server unavailable", "not ready", "socket closed", "channel closed", "connection reset")


def not_found(exc: BaseException) -> bool:
    """Did Milvus refuse the call because a collection (or partition) is not there?"""
    cause = exc.__cause__ or exc
    return getattr(cause, "code", None) == 100 or any(
        w in str(cause).lower() for w in ("not found", "can't find", "not exist"))


def unreachable_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in _UNREACHABLE)


class Link:
    """See the module docstring. `client` is None until `connect()` succeeds."""

    def __init__(self, uri: str, token: str, timeout: float):
        self.uri, self.token, self.timeout = uri, token, timeout
        self.client = None
        self.up = False
        self.reason = ""
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        import pymilvus  # noqa: F401 - its import configures its loggers: quiet them after it

        for name in ("pymilvus", "pymilvus.milvus_client"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

    # ------------------------------------------------------------ calls

    def connect(self) -> None:
        from pymilvus import MilvusClient

        if self.client is None:
            self.client = MilvusClient(uri=self.uri, token=self.token, timeout=self.call_timeout())

    def call_timeout(self) -> float:
        """This call's timeout: the ranker's, or less where the caller's deadline is nearer."""
        deadline = call_deadline()
        if deadline is None:
            return self.timeout
        return max(MIN_TIMEOUT_S, min(self.timeout, deadline - time.monotonic()))

    def unreachable_now(self, exc: BaseException) -> bool:
        """Did this failure come from Milvus being unreachable (not from a refused request)?"""
        return unreachable_error(exc.__cause__ or exc)

    def unreachable(self) -> errors.Unavailable:
        return errors.Unavailable(f"Milvus at {self.uri} is unreachable ({self.reason}): retry later")

    def call(self, doing: str, method: str, *args, **kwargs):
        """`client.method(*args, **kwargs)` with this call's timeout. Refused at
        once while Milvus is down; a failure for want of Milvus tells the watcher."""
        if not self.up and self._thread is not None and threading.current_thread() is not self._thread:
            raise self.unreachable()
        try:
            if callable(method):  # e.g. a query iterator's next()
                return method(*args, **kwargs)
            return getattr(self.client, method)(*args, timeout=self.call_timeout(), **kwargs)
        except errors.ImageSearchError:
            raise
        except Exception as exc:
            if unreachable_error(exc):
                self.went_down(exc)
                raise errors.Unavailable(f"{doing}: Milvus at {self.uri} is unreachable: {exc}") from exc
            raise errors.Unavailable(f"{doing}: Milvus failed, retry later: {exc}") from exc

    # ------------------------------------------------------------ the watcher

    def went_down(self, exc: BaseException | str) -> None:
        """A call found Milvus unreachable: probe now."""
        if self.up:
            self.reason = _short(exc)
            self._wake.set()

    def watch(self, on_up: Callable[[], None], on_change: Callable[[bool], None]) -> None:
        """Start the watcher (see the module docstring); Milvus counts as down
        until `on_up()` has run once without failing."""
        self._thread = threading.Thread(target=self._run, args=(on_up, on_change), name="milvus-watch",
                                        daemon=True)
        self._thread.start()

    def _run(self, on_up: Callable[[], None], on_change: Callable[[bool], None]) -> None:
        known: bool | None = None  # what was last told: nothing yet
        while not self._stop.is_set():
            ok, reason = self._probe(on_up)
            if ok and known is not True:
                log.info("Milvus at %s answers: serving", self.uri)
                self.up = known = True
                _quietly(on_change, True)
            elif not ok and (known is not False or self.up):
                self.reason = reason
                log.error("Milvus at %s is unreachable (%s): health NOT_SERVING, calls UNAVAILABLE, "
                          "retrying every %.0f s", self.uri, reason, PROBE_INTERVAL_S)
                self.up, known = False, False
                _quietly(on_change, False)
            self._wake.wait(PROBE_INTERVAL_S)
            self._wake.clear()

    def _probe(self, on_up: Callable[[], None]) -> tuple[bool, str]:
        try:
            if self.client is None:
                self.connect()
            self.client.list_collections(timeout=PROBE_TIMEOUT_S)
            if not self.up:
                on_up()
            return True, ""
        except Exception as exc:  # noqa: BLE001 - any failure means not serving
            return False, _short(exc)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(PROBE_TIMEOUT_S + 1)
        if self.client is not None:
            self.client.close()


def _quietly(fn: Callable[[bool], None], value: bool) -> None:
    try:
        fn(value)
    except Exception as exc:  # noqa: BLE001 - e.g. the server already stopped: nothing to tell
        log.debug("health not changed: %s", exc)


def _short(exc: BaseException | str) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
