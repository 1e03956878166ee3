"""One background job at a time for one owner (a FAISS collection's rebuild,
a collection's derived re-ranking data): started when due, coalesced (a job
due while one runs starts once that one ends), cancelled by a clean stop.

The owner passes the lock that guards its state (`due()` is read under it)
and `run(job)`, which does the work in the job's thread and returns True
once its result is in place, False when cancelled; it checks
`job.cancelled` between steps (set under the owner's lock). After a
successful job the owner's `due()` is asked again, so writes made during a
job start one more (one, however many writes). A failed job is logged and
not retried until the owner calls `maintain()` again (its next write).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# Seconds a background job sleeps after each chunk of its work: a throttle
# that leaves the cores to searches (0: none); tests use it to hold a job open.
PAUSE_S = float(os.environ.get("IMAGESEARCH_RANKER_REBUILD_PAUSE_S") or 0)
STOP_WAIT_S = 120.0  # how long a stop waits for a cancelled job to end


class Cancelled(Exception):
    """Raised by `Job.step` once the job is cancelled."""


class Job:
    """One run: `cancelled` (set under the owner's lock) stops it before it
    puts its result in place; `done` is set once it has ended."""

    def __init__(self) -> None:
        self.cancelled = False
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    @property
    def background(self) -> bool:
        return threading.current_thread() is self.thread

    def step(self, pause: float | None = None) -> None:
        """Between two chunks of work: Cancelled if cancelled, then the pause
        (`PAUSE_S` by default; only in the job's own thread)."""
        if self.cancelled:
            raise Cancelled
        pause = PAUSE_S if pause is None else pause
        if pause and self.background:
            end = time.monotonic() + pause
            while (left := end - time.monotonic()) > 0:  # a cancel ends the pause too
                if self.cancelled:
                    raise Cancelled
                time.sleep(min(left, 0.05))


class Background:
    """The owner's background job. `maintain()` and reading `job` need the owner's lock."""

    def __init__(self, name: str, lock: threading.Lock, due: Callable[[], bool], run: Callable[[Job], bool],
                 *, thread: str = "", failed: str = "background job failed",
                 on_end: Callable[[Job, bool], None] | None = None):
        self.name = name
        self._thread_name = thread or name
        self._lock = lock
        self._due = due
        self._run = run
        self._failed = failed
        self._on_end = on_end  # called under the lock when a job ends (ok or not)
        self.job: Job | None = None
        self.stopped = False

    def maintain(self) -> None:
        """Start a job if one is due and none runs (caller holds the lock)."""
        if self.job is None and not self.stopped and self._due():
            job = Job()
            self.job = job
            job.thread = threading.Thread(target=self._thread, args=(job,), daemon=True, name=self._thread_name)
            job.thread.start()

    def _thread(self, job: Job) -> None:
        ok = False
        try:
            ok = self._run(job)
        except Cancelled:
            pass
        except Exception:
            log.exception("%s: %s", self.name, self._failed)
        finally:
            with self._lock:
                if self.job is job:
                    self.job = None
                if self._on_end is not None:
                    self._on_end(job, ok)
                if ok:  # writes made during the job may have made another due
                    self.maintain()
            job.done.set()

    def cancel(self) -> Job | None:
        """No more jobs; the one running is cancelled (caller holds the lock). Returns it."""
        self.stopped = True
        job = self.job
        if job is not None:
            job.cancelled = True
        return job

    def stop(self, timeout: float = STOP_WAIT_S) -> None:
        """Cancel (taking the lock) and wait for the job running to end."""
        with self._lock:
            job = self.cancel()
        join(job, self.name, timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no job runs or is due to follow (tests, benchmarks); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (job := self.job) is not None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not job.done.wait(left):
                return False
        return True

    @property
    def running(self) -> bool:
        return self.job is not None


def join(job: Job | None, name: str, timeout: float = STOP_WAIT_S) -> None:
    """Wait for a cancelled job's thread (unless called from it)."""
    if job is not None and job.thread is not None and job.thread is not threading.current_thread():
        job.thread.join(timeout)
        if job.thread.is_alive():
            log.warning("%s: a cancelled job still runs after %.0fs", name, timeout)
