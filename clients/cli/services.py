"""Starting the embedder and ranker as child processes
(`sys.executable -m embedder_service ...` / `-m ranker_service ...`), learning
their ports from the `listening on HOST:PORT` line, waiting for health
SERVING, and stopping them with SIGTERM (their graceful path).

The children run in their own session, so Ctrl-C reaches only this process,
which then stops them in order; on Linux they also get SIGTERM if this
process dies without cleaning up."""

from __future__ import annotations

import collections
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence, TextIO

from clients.channels import ManagedChannel, Security
from clients.errors import ClientError, ServiceUnavailable, UsageError
from imagesearch import extras
from imagesearch.defaults import PARENT_PID_ENV

log = logging.getLogger(__name__)

LISTENING = re.compile(r"listening on (\S+):(\d+)")
EMBEDDER_MODULE = "embedder_service"
RANKER_MODULE = "ranker_service"


def require_extras(*names: str, hint: str = "") -> None:
    """Before any service starts: a UsageError naming the extra this install
    lacks (the children run on this interpreter, so what it lacks they lack)."""
    messages = [m + hint for m in map(extras.missing_extra_message, names) if m is not None]
    if messages:
        raise UsageError("\n".join(messages))


class ChildService:
    """One service process. `echo` is where its output goes live (None: kept
    in memory only; the tail shows in error messages)."""

    KEEP_LINES: int | None = 400  # output lines kept in memory (None: all)

    def __init__(self, what: str, module: str, args: Sequence[str], *, host: str = "127.0.0.1", port: int = 0,
                 env: dict[str, str] | None = None, echo: TextIO | None = None, log_path: str | None = None):
        self.what = what
        self.module = module
        self.host = host
        self.port: int | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=self.KEEP_LINES)
        self._echo = echo
        self._log = open(log_path, "a", encoding="utf-8") if log_path else None
        self._port_seen = threading.Event()
        command = [sys.executable, "-m", module, "--host", host, "--port", str(port), *map(str, args)]
        log.debug("starting %s: %s", what, " ".join(command))
        # The child arms its own death signal from PARENT_PID_ENV (imagesearch/parent.py says why
        # not a preexec_fn here: it would make this a plain fork, which crashes under gRPC).
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid()), **(env or {})}
        try:
            self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         env=full_env, start_new_session=True, errors="replace")
        except OSError as exc:
            raise ClientError(f"cannot start the {what} ({' '.join(command[:3])}): {exc.strerror}") from None
        self._reader = threading.Thread(target=self._read, name=f"{what}-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if self._echo is not None:
                print(f"[{self.what}] {line}", file=self._echo, flush=True)
            if self._log is not None:
                self._log.write(f"[{self.what}] {line}\n")
                self._log.flush()
            m = LISTENING.search(line)
            if m and self.port is None:
                self.port = int(m.group(2))
                self._port_seen.set()

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)
        return f"{host}:{self.port}"

    def tail(self, n: int = 25) -> str:
        return "\n".join(list(self.lines)[-n:])

    def _exited(self) -> ClientError:
        self._reader.join(2)
        return ClientError(f"the {self.what} exited with code {self.proc.returncode} while starting; "
                           f"its last output:\n{self.tail()}")

    def wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._port_seen.wait(0.1):
            if self.proc.poll() is not None:
                raise self._exited()
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"the {self.what} did not start listening in {timeout:.0f}s; "
                                         f"its last output:\n{self.tail()}")

    def wait_ready(self, timeout: float, security: Security | None = None) -> None:
        """`listening on` seen, then health SERVING (the model is loaded)."""
        start = time.monotonic()
        self.wait_listening(timeout)
        channel = ManagedChannel(self.address, [], security=security, retry=None)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise self._exited()
                try:
                    channel.wait_ready(self.what, connect_timeout=2.0, ready_timeout=2.0)
                    return
                except ServiceUnavailable:
                    if time.monotonic() - start > timeout:
                        raise ServiceUnavailable(
                            f"the {self.what} at {self.address} is not serving after {timeout:.0f}s; "
                            f"its last output:\n{self.tail()}") from None
        finally:
            channel.close()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (drain and stop), SIGKILL if that hangs. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("the %s ignored SIGTERM for %.0fs; killing it", self.what, timeout)
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode


class Services:
    """The children this process started, stopped together (reverse order)."""

    def __init__(self):
        self.children: list[ChildService] = []

    def start(self, *args, **kwargs) -> ChildService:
        child = ChildService(*args, **kwargs)
        self.children.append(child)
        return child

    def wait_ready(self, timeout: float, security: Security | None = None) -> None:
        for child in self.children:
            child.wait_ready(timeout, security)

    def stop(self) -> None:
        for child in reversed(self.children):
            code = child.stop()
            if code not in (0, None, -signal.SIGTERM):
                log.warning("the %s exited with code %s; its last output:\n%s", child.what, code, child.tail(10))
        self.children.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def embedder_args(*, checkpoint: str | None = None, backbone: str | None = None, weights: str | None = None,
                  device: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    args: list[str] = []
    if checkpoint:
        args += ["--checkpoint", str(checkpoint)]
    elif backbone:
        args += ["--backbone", backbone]
    if weights and not checkpoint:
        args += ["--weights", weights]
    if device:
        args += ["--device", device]
    return [*args, *extra]


def wait_for_signal(stop_when: Callable[[], bool], poll_s: float = 0.5) -> str:
    """Block until SIGINT/SIGTERM (returns its name) or `stop_when()` is true
    (returns ""). Installs handlers for the duration."""
    received: list[str] = []
    event = threading.Event()

    def handle(signum, _frame):
        received.append(signal.Signals(signum).name)
        event.set()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not event.wait(poll_s):
            if stop_when():
                return ""
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return received[0]
